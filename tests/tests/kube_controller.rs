//! The operator's Kubernetes mode against a real kube-apiserver, with real node runtimes that
//! register as HyperNodes (no kubelet): apply, roll, scale and delete through kubectl; a dead
//! node; kill -9 of the operator and an API server restart; two operators and one leader.

use std::collections::BTreeMap;
use std::time::Duration;

use hyperbox_e2e::kube::*;
use hyperbox_e2e::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(90);

struct Setup {
    c: KubeCluster,
    reg: Registry,
    image: String,
    token: std::path::PathBuf,
    dir: tempfile::TempDir,
}

fn setup() -> Setup {
    let c = KubeCluster::start().unwrap();
    let reg = Registry::start(false).unwrap();
    let image = push_busybox(&reg).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let token = write_token(dir.path()).unwrap();
    Setup {
        c,
        reg,
        image,
        token,
        dir,
    }
}

impl Setup {
    fn node(&self, name: &str, extra: &[&str]) -> Node {
        let mut args = vec!["--insecure-registry", self.reg.addr.as_str()];
        args.extend_from_slice(extra);
        let n = start_node(&self.c.kubeconfig, name, &self.token, &args).unwrap();
        self.c
            .wait_for("hypernode", name, T, "the node registers", |n| {
                condition_is(n, "Ready", "True")
            })
            .unwrap();
        n
    }

    fn operator(&self, extra: &[&str]) -> Operator {
        start_kube_operator(&self.c.kubeconfig, &self.token, self.dir.path(), extra).unwrap()
    }

    fn workload(&self, name: &str, replicas: u32, extra: &str) -> String {
        format!(
            "apiVersion: hyperbox.dev/v1alpha1\nkind: Workload\nmetadata:\n  name: {name}\nspec:\n  image: {}\n  command: [sleep, '1000']\n  replicas: {replicas}\n  terminationGracePeriodSeconds: 0\n{extra}",
            self.image
        )
    }

    fn wait_ready(&self, name: &str, op: &Operator) -> Value {
        self.c
            .wait_for(
                "workload",
                name,
                T,
                "Ready=True at its generation",
                ready_now,
            )
            .with_context_log(op)
    }
}

trait WithLog<T> {
    fn with_context_log(self, op: &Operator) -> T;
}

impl<T> WithLog<T> for anyhow::Result<T> {
    fn with_context_log(self, op: &Operator) -> T {
        match self {
            Ok(v) => v,
            Err(e) => panic!("{e:#}\noperator log:\n{}", tail(&op.log_text(), 6000)),
        }
    }
}

/// Running containers of workload `name` on each node.
fn running(nodes: &[(&str, &Node)], name: &str) -> BTreeMap<String, Vec<String>> {
    nodes
        .iter()
        .map(|(n, node)| {
            let ids = node
                .get(name)
                .map(|w| {
                    w["replicas"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .filter(|r| r["phase"] == "Running")
                        .filter_map(|r| r["containerId"].as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            (n.to_string(), ids)
        })
        .collect()
}

fn total(r: &BTreeMap<String, Vec<String>>) -> usize {
    r.values().map(Vec::len).sum()
}

#[test]
fn kubectl_apply_update_scale_and_delete_drive_real_containers() {
    let s = setup();
    let n1 = s.node("n1", &[]);
    let n2 = s.node("n2", &[]);
    let nodes = [("n1", &n1), ("n2", &n2)];
    let op = s.operator(&[]);
    // Apply: both replicas run, spread over the two nodes, then Ready at generation 1.
    let out = s.c.apply(&s.workload("web", 2, ""));
    assert!(out.status.success(), "{out:?}");
    let w = s.wait_ready("web", &op);
    let r = running(&nodes, "web");
    assert_eq!(total(&r), 2, "{r:?}");
    assert_eq!(r["n1"].len(), 1, "spread: {r:?}");
    assert_eq!(w["status"]["readyReplicas"], 2);
    assert_eq!(w["status"]["ready"], "2/2");
    let placed: Vec<&str> = w["status"]["replicaStatuses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["node"].as_str().unwrap())
        .collect();
    assert_eq!(placed.len(), 2, "{w:#}");
    let digests: Vec<&str> = w["status"]["replicaStatuses"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["imageDigest"].as_str())
        .collect();
    assert_eq!(digests.len(), 2, "{w:#}");
    let ids: Vec<String> = w["status"]["replicaStatuses"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["containerId"].as_str().map(String::from))
        .collect();
    let mut on_nodes: Vec<String> = r.values().flatten().cloned().collect();
    on_nodes.sort();
    let mut reported = ids.clone();
    reported.sort();
    assert_eq!(reported, on_nodes, "status names the real containers");
    // kubectl get shows the columns filled in.
    let table = s.c.kubectl_ok(&["get", "workloads"]).unwrap();
    let row = table
        .lines()
        .find(|l| l.starts_with("web"))
        .unwrap()
        .to_string();
    assert!(
        row.contains("2/2") && row.contains("n1") && row.contains("n2"),
        "{table}"
    );
    // The finalizer is on it.
    assert_eq!(w["metadata"]["finalizers"][0], "hyperbox.dev/containers");

    // An update rolls: new containers, Ready again at generation 2.
    let out =
        s.c.apply(&s.workload("web", 2, "  env: [{name: V, value: '2'}]\n"));
    assert!(out.status.success(), "{out:?}");
    let w =
        s.c.wait_for("workload", "web", T, "rolled to generation 2", |w| {
            ready_now(w) && w["metadata"]["generation"] == 2
        })
        .with_context_log(&op);
    assert_eq!(w["status"]["updatedReplicas"], 2);
    let after = running(&nodes, "web");
    assert_eq!(total(&after), 2, "{after:?}");
    for id in after.values().flatten() {
        assert!(!on_nodes.contains(id), "{id} survived the update");
    }

    // kubectl scale goes through the scale subresource.
    s.c.kubectl_ok(&["scale", "workload/web", "--replicas=3"])
        .unwrap();
    s.c.wait_for("workload", "web", T, "scaled to 3", |w| {
        ready_now(w) && w["status"]["readyReplicas"] == 3
    })
    .with_context_log(&op);
    assert_eq!(total(&running(&nodes, "web")), 3);
    // The nodes agree: nothing else runs under that name.
    let events = s.c.kubectl_ok(&["get", "events", "-o", "json"]).unwrap();
    assert!(events.contains("Placed"), "{events}");

    // kubectl delete: the containers stop before the object goes.
    let out =
        s.c.kubectl(&["delete", "workload", "web", "--wait=true", "--timeout=60s"]);
    assert!(
        out.status.success(),
        "{out:?}\n{}",
        tail(&op.log_text(), 6000)
    );
    assert!(s.c.get("workload", "web").is_none());
    assert!(n1.get("web").is_none() && n2.get("web").is_none());
    assert!(n1.container_pids().is_empty() && n2.container_pids().is_empty());
}

#[test]
fn a_dead_node_goes_not_ready_and_its_replicas_move_after_the_grace() {
    let s = setup();
    let mut n1 = s.node("n1", &[]);
    let n2 = s.node("n2", &[]);
    let op = s.operator(&["--node-monitor-grace", "5s", "--node-grace", "5s"]);
    assert!(s.c.apply(&s.workload("svc", 2, "")).status.success());
    s.wait_ready("svc", &op);
    let nodes = [("n1", &n1), ("n2", &n2)];
    assert_eq!(running(&nodes, "svc")["n2"].len(), 1);
    n1.kill9();
    let hn =
        s.c.wait_for("hypernode", "n1", T, "n1 marked not ready", |n| {
            condition_is(n, "Ready", "False")
        })
        .with_context_log(&op);
    assert_eq!(
        condition(&hn, "Ready").unwrap().1,
        "NodeHeartbeatMissed",
        "{hn:#}"
    );
    // After the grace, n2 runs both replicas and the workload is Ready there.
    let w =
        s.c.wait_for("workload", "svc", T, "replicas moved to n2", |w| {
            ready_now(w) && w["status"]["nodes"] == "n2" && w["status"]["readyReplicas"] == 2
        })
        .with_context_log(&op);
    assert_eq!(
        n2.get("svc").unwrap()["replicas"].as_array().unwrap().len(),
        2,
        "{w:#}"
    );
    // n2 still Ready, n1 not: placement saw both.
    let n2obj = s.c.get("hypernode", "n2").unwrap();
    assert_eq!(condition(&n2obj, "Ready").unwrap().0, "True");
    let on_n2 = running(&[("n2", &n2)], "svc");
    // n1 comes back (its container kept running, and it re-adopts it): its stale copy is
    // removed, and n2's replicas stay where they are.
    n1.spawn().unwrap();
    s.c.wait_for("hypernode", "n1", T, "n1 ready again", |n| {
        condition_is(n, "Ready", "True")
    })
    .with_context_log(&op);
    wait_until(T, "n1's copy removed", || {
        n1.get("svc").is_none().then_some(())
    })
    .with_context_log(&op);
    assert!(n1.container_pids().is_empty());
    assert_eq!(running(&[("n2", &n2)], "svc"), on_n2);
    assert!(ready_now(&s.c.get("workload", "svc").unwrap()));
}

/// The operator's clock five minutes ahead (an edge box without an RTC): by its clock every
/// heartbeat is five minutes old, sixty times the grace. The heartbeats keep changing and the
/// nodes answer, so no node is marked not ready and no replica moves or restarts (before the
/// fleet core judged liveness on its own clock, both nodes' containers were deleted).
#[test]
fn a_reachable_node_keeps_its_replicas_when_the_operators_clock_is_ahead() {
    let s = setup();
    let n1 = s.node("n1", &[]);
    let n2 = s.node("n2", &[]);
    let op = start_kube_operator_wrapped(
        &s.c.kubeconfig,
        &s.token,
        s.dir.path(),
        &["faketime", "-f", "+300s"],
        &["--node-monitor-grace", "5s", "--node-grace", "5s"],
    )
    .unwrap();
    assert!(s.c.apply(&s.workload("svc", 2, "")).status.success());
    s.wait_ready("svc", &op);
    let nodes = [("n1", &n1), ("n2", &n2)];
    let before = running(&nodes, "svc");
    assert_eq!(total(&before), 2, "{before:?}");
    // Four times both graces together.
    std::thread::sleep(Duration::from_secs(40));
    assert_eq!(
        running(&nodes, "svc"),
        before,
        "operator log:\n{}",
        tail(&op.log_text(), 6000)
    );
    for n in ["n1", "n2"] {
        let hn = s.c.get("hypernode", n).unwrap();
        assert_eq!(condition(&hn, "Ready").unwrap().0, "True", "{hn:#}");
    }
    assert!(ready_now(&s.c.get("workload", "svc").unwrap()));
    let log = op.log_text();
    assert!(!log.contains("node not ready"), "{}", tail(&log, 6000));
}

#[test]
fn operator_kill_and_api_server_restart_make_no_duplicates_and_no_flapping() {
    let s = setup();
    let n1 = s.node("n1", &[]);
    let n2 = s.node("n2", &[]);
    let nodes = [("n1", &n1), ("n2", &n2)];
    let mut op = s.operator(&[]);
    // Ten workloads at once; kill -9 the operator while it works through them.
    let mut yaml = String::new();
    for i in 0..10 {
        yaml.push_str(&s.workload(&format!("w{i}"), 2, ""));
        yaml.push_str("---\n");
    }
    assert!(s.c.apply(&yaml).status.success());
    wait_until(T, "some containers started", || {
        (0..10)
            .any(|i| total(&running(&nodes, &format!("w{i}"))) > 0)
            .then_some(())
    })
    .unwrap();
    op.kill9();
    op.spawn().unwrap();
    for i in 0..10 {
        s.wait_ready(&format!("w{i}"), &op);
    }
    let before: Vec<BTreeMap<String, Vec<String>>> =
        (0..10).map(|i| running(&nodes, &format!("w{i}"))).collect();
    for (i, r) in before.iter().enumerate() {
        assert_eq!(total(r), 2, "w{i}: {r:?}");
    }
    let versions = |c: &KubeCluster| -> Vec<String> {
        (0..10)
            .map(|i| {
                c.get("workload", &format!("w{i}")).unwrap()["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    };
    let rv = versions(&s.c);
    // An API server restart: watches break and resume; nothing is re-created and the
    // statuses are not rewritten (Ready stays True, the objects do not change).
    s.c.restart_apiserver().unwrap();
    std::thread::sleep(Duration::from_secs(8));
    for i in 0..10 {
        let w = s.c.get("workload", &format!("w{i}")).unwrap();
        assert!(ready_now(&w), "w{i}: {w:#}");
    }
    let after: Vec<BTreeMap<String, Vec<String>>> =
        (0..10).map(|i| running(&nodes, &format!("w{i}"))).collect();
    assert_eq!(before, after, "containers changed");
    assert_eq!(
        rv,
        versions(&s.c),
        "statuses were rewritten\n{}",
        tail(&op.log_text(), 6000)
    );
    // Another kill -9 of the idle operator changes nothing either.
    op.kill9();
    op.spawn().unwrap();
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        before,
        (0..10)
            .map(|i| running(&nodes, &format!("w{i}")))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        rv,
        versions(&s.c),
        "statuses flapped after a restart\n{}",
        tail(&op.log_text(), 6000)
    );
}

#[test]
fn two_operators_elect_one_leader_and_the_other_takes_over() {
    let s = setup();
    let n1 = s.node("n1", &[]);
    let nodes = [("n1", &n1)];
    let lease = ["--lease-duration", "6s"];
    let mut a = s.operator(&[&lease[..], &["--identity", "op-a"]].concat());
    wait_until(T, "op-a leads", || {
        let l = s.c.get("lease", "hyperbox-operator")?;
        (l["spec"]["holderIdentity"] == "op-a").then_some(())
    })
    .with_context_log(&a);
    let b = s.operator(&[&lease[..], &["--identity", "op-b"]].concat());
    assert!(s.c.apply(&s.workload("one", 1, "")).status.success());
    s.wait_ready("one", &a);
    wait_until(T, "op-b stands by", || {
        b.log_text().contains("standing by").then_some(())
    })
    .with_context_log(&b);
    // Only the leader acts: the standby never reconciled anything.
    assert!(!b.log_text().contains("reconciled"), "{}", b.log_text());
    let l = s.c.get("lease", "hyperbox-operator").unwrap();
    assert_eq!(l["spec"]["holderIdentity"], "op-a");
    // Kill the leader: op-b takes over once the lease expires (6 s after op-a's last renew)
    // at its next try (every 2 s), and does the work. The bound adds 4 s for a loaded
    // machine and the polling here.
    a.kill9();
    let killed = std::time::Instant::now();
    wait_until(Duration::from_secs(20), "op-b leads", || {
        let l = s.c.get("lease", "hyperbox-operator")?;
        (l["spec"]["holderIdentity"] == "op-b").then_some(())
    })
    .with_context_log(&b);
    assert!(
        killed.elapsed() < Duration::from_secs(6 + 2 + 4),
        "{:?}",
        killed.elapsed()
    );
    assert!(s.c.apply(&s.workload("two", 1, "")).status.success());
    s.wait_ready("two", &b);
    assert_eq!(total(&running(&nodes, "two")), 1);
    assert_eq!(total(&running(&nodes, "one")), 1);
}

/// A node that hangs (its daemon stopped: connections are accepted and never answered) while
/// one workload's reconcile talks to it delays no other workload: the placement lock is not
/// held across node calls, and each node call has its own deadline. Before, the second
/// workload waited for the first one's 30 s request timeout.
#[test]
fn a_hung_node_delays_no_other_workload() {
    let s = setup();
    let n1 = s.node("n1", &["--label", "role=a"]);
    let n2 = s.node("n2", &["--label", "role=b"]);
    let op = s.operator(&["--node-monitor-grace", "120s", "--node-grace", "300s"]);
    let slow = |v: &str| {
        s.workload(
            "slow",
            1,
            &format!("  nodeSelector: {{role: b}}\n  env: [{{name: V, value: '{v}'}}]\n"),
        )
    };
    assert!(s.c.apply(&slow("1")).status.success());
    s.wait_ready("slow", &op);
    // n2's sockets still accept, nothing answers.
    let paused = pause(n2.pid());
    assert!(s.c.apply(&slow("2")).status.success());
    // Let slow's reconcile reach n2 and hang there.
    std::thread::sleep(Duration::from_secs(2));
    let t0 = std::time::Instant::now();
    assert!(s
        .c
        .apply(&s.workload("quick", 1, "  nodeSelector: {role: a}\n"))
        .status
        .success());
    s.wait_ready("quick", &op);
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(20),
        "quick took {took:?} behind the hung node\n{}",
        tail(&op.log_text(), 6000)
    );
    assert_eq!(running(&[("n1", &n1)], "quick")["n1"].len(), 1);
    // n2 wakes up: slow's new spec reaches it.
    drop(paused);
    s.c.wait_for("workload", "slow", T, "slow ready at generation 2", |w| {
        ready_now(w) && w["status"]["observedGeneration"] == 2
    })
    .with_context_log(&op);
}

/// `maxUnavailable: 1` is the Workload's, not each node's: with one replica on each of four
/// nodes, a new version (unready for a second after it starts) rolls one node at a time and
/// at least three replicas are ready at every sample.
#[test]
fn a_rollout_across_four_nodes_keeps_the_workloads_budget() {
    let s = setup();
    let nodes: Vec<Node> = ["n1", "n2", "n3", "n4"]
        .iter()
        .map(|n| s.node(n, &[]))
        .collect();
    let op = s.operator(&[]);
    let spec = |v: &str| {
        s.workload(
            "web",
            4,
            &format!("  env: [{{name: V, value: '{v}'}}]\n  command: [sh, -c, 'sleep 1; touch /tmp/ready; exec sleep 1000']\n  readinessProbe:\n    exec: {{command: [test, -f, /tmp/ready]}}\n    periodSeconds: 0.2\n  strategy:\n    rollingUpdate: {{maxSurge: 0, maxUnavailable: 1}}\n"),
        )
    };
    assert!(s.c.apply(&spec("1")).status.success());
    s.wait_ready("web", &op);
    let all: Vec<&Node> = nodes.iter().collect();
    for n in &all {
        let st = n.status_now("web");
        assert_eq!(
            st.as_ref().map(|s| s["readyReplicas"].clone()),
            Some(Value::from(1)),
            "one replica on each node: {st:?}"
        );
    }
    let v1_hash = nodes[0].status_now("web").unwrap()["specHash"].clone();
    assert!(s.c.apply(&spec("2")).status.success());
    let seen = sample_rollout(&all, "web", &v1_hash, 1, T).with_context_log(&op);
    assert!(
        seen.fewest_ready >= 3,
        "{seen:?}\n{}",
        tail(&op.log_text(), 6000)
    );
    assert!(
        seen.done_at
            .windows(2)
            .all(|w| w[1] - w[0] >= Duration::from_millis(500)),
        "nodes finished too close together: {seen:?}"
    );
    s.c.wait_for("workload", "web", T, "web ready at generation 2", |w| {
        ready_now(w) && w["status"]["observedGeneration"] == 2
    })
    .with_context_log(&op);
}

/// A Workload deleted while one of its nodes is down past the grace is gone at once (the
/// deletion does not wait for a lost node), and the copy that node still runs is removed
/// when it comes back: the operator's orphan sweep finds a copy of its own whose Workload no
/// longer exists. Before, it ran forever.
#[test]
fn a_workload_deleted_while_its_node_was_down_is_removed_when_the_node_returns() {
    let s = setup();
    let n1 = s.node("n1", &[]);
    let mut n2 = s.node("n2", &[]);
    let op = s.operator(&["--node-monitor-grace", "3s", "--node-grace", "3s"]);
    assert!(s.c.apply(&s.workload("svc", 2, "")).status.success());
    s.wait_ready("svc", &op);
    let nodes = [("n1", &n1), ("n2", &n2)];
    assert_eq!(running(&nodes, "svc")["n2"].len(), 1);
    n2.kill9();
    s.c.wait_for("hypernode", "n2", T, "n2 marked not ready", |n| {
        condition_is(n, "Ready", "False")
    })
    .with_context_log(&op);
    assert!(s
        .c
        .kubectl(&["delete", "workload", "svc", "--wait=false"])
        .status
        .success());
    wait_until(T, "the Workload gone", || {
        s.c.get("workload", "svc").is_none().then_some(())
    })
    .with_context_log(&op);
    assert!(n1.get("svc").is_none());
    // n2 comes back with its container (re-adopted): the copy is an orphan and goes.
    n2.spawn().unwrap();
    wait_until(T, "n2's orphan removed", || {
        n2.get("svc").is_none().then_some(())
    })
    .with_context_log(&op);
    assert!(n2.container_pids().is_empty());
    assert!(op.log_text().contains("removed an orphan"));
}

/// Where replicas were placed outlives the operator: after n1 was lost and its replica moved
/// to n2, the operator restarts while n1 comes back still holding its copy. The restarted
/// operator places from the Workload's recorded placement, so n1's copy is stale and removed,
/// and n2 keeps both replicas without a restart. Before, the copies the nodes held were taken
/// as the placement: n1's stale replica was kept and one of n2's was stopped.
#[test]
fn a_restarted_operator_sees_a_returning_nodes_copy_as_stale() {
    let s = setup();
    let mut n1 = s.node("n1", &[]);
    let n2 = s.node("n2", &[]);
    let mut op = s.operator(&["--node-monitor-grace", "3s", "--node-grace", "3s"]);
    assert!(s.c.apply(&s.workload("svc", 2, "")).status.success());
    s.wait_ready("svc", &op);
    assert_eq!(running(&[("n1", &n1)], "svc")["n1"].len(), 1);
    n1.kill9();
    s.c.wait_for("workload", "svc", T, "both replicas on n2", |w| {
        ready_now(w) && w["status"]["nodes"] == "n2" && w["status"]["readyReplicas"] == 2
    })
    .with_context_log(&op);
    let on_n2 = running(&[("n2", &n2)], "svc");
    assert_eq!(on_n2["n2"].len(), 2);
    op.kill9();
    n1.spawn().unwrap();
    op.spawn().unwrap();
    wait_until(T, "n1's stale copy removed", || {
        n1.get("svc").is_none().then_some(())
    })
    .with_context_log(&op);
    // Settled: n2 still runs the same two containers.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        running(&[("n2", &n2)], "svc"),
        on_n2,
        "{}",
        tail(&op.log_text(), 6000)
    );
    assert!(n1.container_pids().is_empty());
    assert!(ready_now(&s.c.get("workload", "svc").unwrap()));
}

/// The leader cut off from the API server (a frozen proxy: its requests hang) while it still
/// reaches the nodes stops acting within its renew deadline, before the standby may take
/// over; the standby's epoch is one higher, the node records it, and a write with the old
/// leader's epoch is refused.
#[test]
fn a_leader_cut_off_from_the_api_server_stops_before_the_standby_acts() {
    let s = setup();
    let n1 = s.node("n1", &[]);
    let kubeconfig = std::fs::read_to_string(&s.c.kubeconfig).unwrap();
    let server = kubeconfig
        .lines()
        .find_map(|l| l.trim().strip_prefix("server: https://"))
        .unwrap()
        .to_string();
    let proxy = FreezableProxy::start(&server).unwrap();
    let via_proxy = s.dir.path().join("kubeconfig-via-proxy");
    std::fs::write(&via_proxy, kubeconfig.replace(&server, &proxy.addr)).unwrap();
    let lease = ["--lease-duration", "6s"];
    let mut a = start_kube_operator(
        &via_proxy,
        &s.token,
        s.dir.path(),
        &[&lease[..], &["--identity", "op-a"]].concat(),
    )
    .unwrap();
    wait_until(T, "op-a leads", || {
        let l = s.c.get("lease", "hyperbox-operator")?;
        (l["spec"]["holderIdentity"] == "op-a").then_some(())
    })
    .with_context_log(&a);
    let epoch_a = s.c.get("lease", "hyperbox-operator").unwrap()["spec"]["leaseTransitions"]
        .as_u64()
        .unwrap();
    assert!(s.c.apply(&s.workload("one", 1, "")).status.success());
    s.wait_ready("one", &a);
    let b = s.operator(&[&lease[..], &["--identity", "op-b"]].concat());
    wait_until(T, "op-b stands by", || {
        b.log_text().contains("standing by").then_some(())
    })
    .with_context_log(&b);
    proxy.freeze();
    let cut = std::time::Instant::now();
    // op-a gives up within its renew deadline (4 s) after its last renew, and exits.
    wait_until(Duration::from_secs(20), "op-a stops", || {
        a.exited().then_some(())
    })
    .with_context_log(&a);
    let a_stopped = cut.elapsed();
    wait_until(T, "op-b leads", || {
        let l = s.c.get("lease", "hyperbox-operator")?;
        (l["spec"]["holderIdentity"] == "op-b").then_some(())
    })
    .with_context_log(&b);
    let b_leads = cut.elapsed();
    assert!(
        a_stopped < b_leads,
        "op-a stopped {a_stopped:?} after the cut, op-b led at {b_leads:?}"
    );
    let log_a = a.log_text();
    assert!(
        log_a.contains("could not renew the lease within the renew deadline"),
        "{}",
        tail(&log_a, 4000)
    );
    // op-b acts, with the next epoch.
    let epoch_b = s.c.get("lease", "hyperbox-operator").unwrap()["spec"]["leaseTransitions"]
        .as_u64()
        .unwrap();
    assert_eq!(epoch_b, epoch_a + 1);
    assert!(s.c.apply(&s.workload("two", 1, "")).status.success());
    s.wait_ready("two", &b);
    let fences: Value =
        serde_json::from_slice(&std::fs::read(n1.state.join("fences.json")).unwrap()).unwrap();
    assert_eq!(fences["kubernetes:kubernetes"], epoch_b, "{fences}");
    // A write of op-a's epoch (what op-a would send had it not stopped) is refused.
    let stale = http_with_headers(
        &n1.socket,
        "DELETE",
        "/v1/workloads/default/one",
        &[(
            "x-hyperbox-fence",
            &format!("kubernetes:kubernetes={epoch_a}"),
        )],
        "",
    );
    assert!(
        stale.starts_with("HTTP/1.1 409") && stale.contains("a newer leader took over"),
        "{stale}"
    );
    assert!(n1.get("one").is_some());
    proxy.thaw();
}

/// A HyperNode whose address is plain http is not used (its token would travel in the
/// clear) unless the operator is told to allow it; the reason is logged and the workload
/// waits instead of going there.
#[test]
fn a_plain_http_node_address_is_refused_unless_allowed() {
    let s = setup();
    let n1 = s.node("n1", &[]);
    let op = s.operator(&["--https-nodes-only"]);
    assert!(s.c.apply(&s.workload("svc", 1, "")).status.success());
    wait_until(T, "the refusal logged", || {
        op.log_text().contains("is not https").then_some(())
    })
    .with_context_log(&op);
    std::thread::sleep(Duration::from_secs(3));
    assert!(n1.get("svc").is_none());
    let w = s.c.get("workload", "svc").unwrap();
    assert!(!ready_now(&w), "{w:#}");
    assert_eq!(
        condition(&w, "Ready").unwrap(),
        ("False".to_string(), "NodeUnreachable".to_string())
    );
    let message = w["status"]["conditions"][0]["message"].as_str().unwrap();
    assert!(message.contains("is not https"), "{w:#}");
}
