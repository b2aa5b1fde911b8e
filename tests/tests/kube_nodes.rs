//! HyperNode registration against a real API server: two node runtimes given one name (a
//! cloned disk image, a typo in `--node-name`) are detected and reported, never merged into
//! one HyperNode; the name passes to the other node only once the holder's heartbeats stop.

use std::time::{Duration, Instant};

use hyperbox_e2e::kube::*;
use hyperbox_e2e::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(60);

fn problem(n: &Node) -> Option<String> {
    n.node_json()["registrationProblem"]
        .as_str()
        .map(String::from)
}

/// For `d`, the HyperNode stays `id`'s, with `address`, and its heartbeat still moves.
fn stays_with(c: &KubeCluster, id: &str, address: &str, d: Duration) {
    let until = Instant::now() + d;
    let mut beats = std::collections::BTreeSet::new();
    while Instant::now() < until {
        let hn = c.get("hypernode", "n1").unwrap();
        assert_eq!(hn["spec"]["nodeId"], id, "{hn:#}");
        assert_eq!(hn["spec"]["address"], address, "{hn:#}");
        beats.insert(hn["status"]["heartbeatTime"].to_string());
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(
        beats.len() >= 2,
        "the holder's heartbeat stood still: {beats:?}"
    );
}

#[test]
fn two_nodes_with_one_name_are_reported_not_merged_and_a_silent_holder_is_taken_over() {
    let c = KubeCluster::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let token = write_token(dir.path()).unwrap();
    let mut a = start_node(&c.kubeconfig, "n1", &token, &[]).unwrap();
    let hn: Value = c
        .wait_for("hypernode", "n1", T, "a registered", |n| {
            condition_is(n, "Ready", "True")
        })
        .unwrap_or_else(|e| panic!("{e:#}\n{}", tail(&a.daemon_log(), 3000)));
    let a_id = a.node_json()["id"].as_str().unwrap().to_string();
    let a_addr = hn["spec"]["address"].as_str().unwrap().to_string();
    assert_eq!(hn["spec"]["nodeId"], a_id.as_str());
    // A second node (its own state dir, so its own id) under the same name.
    let mut b = start_node(&c.kubeconfig, "n1", &token, &[]).unwrap();
    let b_id = b.node_json()["id"].as_str().unwrap().to_string();
    assert_ne!(a_id, b_id);
    let said = wait_until(T, "b reports the duplicate", || {
        problem(&b).filter(|p| p.contains(&a_id))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", tail(&b.daemon_log(), 3000)));
    assert!(said.contains("two nodes have this name"), "{said}");
    assert!(b.daemon_log().contains("two nodes have this name"));
    // Not merged: the HyperNode stays a's (id, address) while both heartbeat, and a's own
    // status is not disturbed.
    stays_with(&c, &a_id, &a_addr, Duration::from_secs(5));
    assert!(problem(&a).is_none());
    // a stops: b takes the name over once a's heartbeat stood still for 4 intervals (4 s).
    a.kill9();
    let stopped = Instant::now();
    let hn = c
        .wait_for("hypernode", "n1", T, "taken over by b", |n| {
            n["spec"]["nodeId"] == b_id.as_str() && condition_is(n, "Ready", "True")
        })
        .unwrap_or_else(|e| panic!("{e:#}\n{}", tail(&b.daemon_log(), 3000)));
    assert!(
        stopped.elapsed() >= Duration::from_secs(3),
        "taken over {:?} after the holder stopped",
        stopped.elapsed()
    );
    let b_addr = hn["spec"]["address"].as_str().unwrap().to_string();
    assert_ne!(a_addr, b_addr);
    assert!(b.daemon_log().contains("taking over the HyperNode"));
    wait_until(T, "b's problem cleared", || {
        problem(&b).is_none().then_some(())
    })
    .unwrap();
    // a comes back (same state dir, same id): now it is the one that waits.
    a.spawn().unwrap();
    wait_until(T, "a reports the duplicate", || {
        problem(&a).filter(|p| p.contains(&b_id))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", tail(&a.daemon_log(), 3000)));
    stays_with(&c, &b_id, &b_addr, Duration::from_secs(3));
    b.kill9();
}
