//! Node admission with real containers: requests against allocatable (capacity minus
//! `--reserve`), node labels and nodeSelector, typed refusals, a stable node id.

use std::time::Duration;

use hyperbox_e2e::*;

const T: Duration = Duration::from_secs(60);
const MI: u64 = 1 << 20;

fn sleeper(name: &str, image: &str, extra: &str) -> String {
    workload(
        name,
        image,
        &format!("  command: [sleep, '1000']\n  terminationGracePeriodSeconds: 0\n{extra}"),
    )
}

#[test]
fn requests_are_admitted_against_allocatable_with_typed_refusals() {
    let reg = Registry::start(false).unwrap();
    let image = push_busybox(&reg).unwrap();
    // Leave exactly 1000Mi allocatable, whatever this machine has.
    let reserve = format!("cpu=0,memory={}", mem_total() - 1000 * MI);
    let mut node = Node::start(&[
        "--insecure-registry",
        &reg.addr,
        "--reserve",
        &reserve,
        "--label",
        "zone=a",
        "--label",
        "topology.kubernetes.io/region=eu",
    ])
    .unwrap();
    let n = node.node_json();
    assert_eq!(n["allocatable"]["memoryBytes"], 1000 * MI);
    let id = n["id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 32, "{n}");
    assert_eq!(n["labels"]["zone"], "a");
    assert_eq!(n["labels"]["topology.kubernetes.io/region"], "eu");
    assert_eq!(n["labels"]["kubernetes.io/os"], "linux");
    assert_eq!(n["labels"]["kubernetes.io/hostname"], n["name"]);

    // a takes 600Mi (its limit, as no request is given).
    let out = node.apply(&sleeper("a", &image, "  resources: {memory: 600Mi}\n"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let a = node
        .wait_for("a", T, "a running", |v| v["phase"] == "Running")
        .unwrap();
    assert_eq!(node.node_json()["requested"]["memoryBytes"], 600 * MI);

    // b asks for 600Mi more: refused with its reason, field and numbers; nothing of it exists.
    let out = node.apply(&sleeper(
        "b",
        &image,
        "  resources: {memory: 1Gi, requests: {memory: 600Mi}}\n",
    ));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("(403)"), "{err}");
    assert!(
        err.contains("workloads[0].spec.resources.requests.memory: InsufficientMemory: 1 × 600Mi requested; 400Mi of the node's 1000Mi allocatable memory is free"),
        "{err}"
    );
    assert!(node.get("b").is_none());
    // Scaling a to two replicas does not fit either, and a keeps its container.
    let out = node.apply(&sleeper(
        "a",
        &image,
        "  replicas: 2\n  resources: {memory: 600Mi}\n",
    ));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("InsufficientMemory: 2 × 600Mi"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let a_now = node.get("a").unwrap();
    assert_eq!(a_now["containerId"], a["containerId"]);
    assert_eq!(a_now["replicas"].as_array().unwrap().len(), 1);

    // A nodeSelector the labels do not satisfy is refused; a matching one runs.
    let out = node.apply(&sleeper("far", &image, "  nodeSelector: {zone: b}\n"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("spec.nodeSelector.zone: NodeSelectorMismatch: the workload asks for zone=b"),
        "{err}"
    );
    let out = node.apply(&sleeper(
        "near",
        &image,
        "  nodeSelector: {zone: a, kubernetes.io/os: linux}\n",
    ));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    node.wait_for("near", T, "near running", |v| v["phase"] == "Running")
        .unwrap();

    // Deleting a frees its requests at once: b fits now.
    assert!(node.cli(&["delete", "a"]).status.success());
    let out = node.apply(&sleeper(
        "b",
        &image,
        "  resources: {memory: 1Gi, requests: {memory: 600Mi}}\n",
    ));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    node.wait_for("b", T, "b running", |v| v["phase"] == "Running")
        .unwrap();

    // After a restart the node keeps its id and counts what it admitted before.
    node.kill9();
    node.spawn().unwrap();
    let n = node.node_json();
    assert_eq!(n["id"], id.as_str());
    assert_eq!(n["requested"]["memoryBytes"], 600 * MI);
    let out = node.apply(&sleeper(
        "c",
        &image,
        "  resources: {requests: {memory: 500Mi}}\n",
    ));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("InsufficientMemory"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn bad_node_flags_and_bad_requests_are_refused_up_front() {
    // A bad --label or --reserve stops the daemon before it serves.
    for args in [["--label", "no-value"], ["--reserve", "gpu=1"]] {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new(bin("hyperbox-node"))
            .arg("--socket")
            .arg(dir.path().join("s"))
            .args(["serve", "--state-dir"])
            .arg(dir.path().join("state"))
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(args[1]), "{err}");
    }
    // A request above its limit is a validation error naming the field.
    let node = Node::start(&[]).unwrap();
    let out = node.apply(&workload(
        "x",
        "127.0.0.1:1/x:1",
        "  resources: {memory: 100Mi, requests: {memory: 200Mi}}\n",
    ));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("spec.resources.requests.memory")
            && err.contains("more than the memory limit 100Mi"),
        "{err}"
    );
}
