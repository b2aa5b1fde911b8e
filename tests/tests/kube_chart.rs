//! The Helm chart against a real API server: `helm lint`, `helm template` accepted by the
//! server (`kubectl apply --dry-run=server`), and the operator and two nodes doing their whole
//! job with exactly the chart's RBAC, authenticated as the chart's ServiceAccounts (tokens from
//! the TokenRequest API, checked by the real RBAC authorizer), and talking to the nodes over
//! TLS with a token, as the chart sets them up. Each node has its own credential (a token bound
//! to its Kubernetes node, or a user of the node group), and the chart's admission policy lets
//! it write only its own HyperNode.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyperbox_e2e::kube::*;
use hyperbox_e2e::*;

const T: Duration = Duration::from_secs(90);
const NS: &str = "hyperbox-system";

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/hyperbox")
}

fn helm(c: &KubeCluster, args: &[&str]) -> String {
    let out = std::process::Command::new(c.dir.path().join("bin/helm"))
        .args(args)
        .env("HOME", c.dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "helm {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn the_chart_lints_and_the_api_server_accepts_its_templates() {
    let c = KubeCluster::start_bare().unwrap();
    let chart = chart();
    let lint = helm(&c, &["lint", "--strict", chart.to_str().unwrap()]);
    assert!(lint.contains("0 chart(s) failed"), "{lint}");
    // The chart ships the generated CRDs unchanged.
    assert_eq!(
        std::fs::read_to_string(chart.join("crds/hyperbox.yaml")).unwrap(),
        std::fs::read_to_string(crds_file()).unwrap(),
        "charts/hyperbox/crds is stale: cp crds/hyperbox.yaml charts/hyperbox/crds/"
    );
    c.kubectl_ok(&["create", "namespace", NS]).unwrap();
    for values in [
        vec![],
        vec!["--set", "node.metricsPort=0,operator.replicas=1"],
    ] {
        let mut args = vec![
            "template",
            "hb",
            chart.to_str().unwrap(),
            "-n",
            NS,
            "--include-crds",
        ];
        args.extend(values.iter().copied());
        let rendered = helm(&c, &args);
        let f = c.dir.path().join("rendered.yaml");
        std::fs::write(&f, &rendered).unwrap();
        let out = c
            .kubectl_ok(&[
                "apply",
                "--dry-run=server",
                "--validate=strict",
                "-f",
                f.to_str().unwrap(),
            ])
            .unwrap();
        for kind in [
            "customresourcedefinition.apiextensions.k8s.io/workloads.hyperbox.dev",
            "deployment.apps/hb-operator",
            "daemonset.apps/hb-node",
            "clusterrole.rbac.authorization.k8s.io/hb-operator",
            "role.rbac.authorization.k8s.io/hb-operator-leader",
        ] {
            assert!(out.contains(kind), "{kind} missing: {out}");
        }
        assert!(rendered.contains("privileged: true") && rendered.contains("hostPID: true"));
    }
}

/// The release namespace, and the chart's RBAC and node identity policy applied to it.
fn apply_rbac_and_identity(c: &KubeCluster) {
    c.kubectl_ok(&["create", "namespace", NS]).unwrap();
    let rendered = helm(
        c,
        &[
            "template",
            "hb",
            chart().to_str().unwrap(),
            "-n",
            NS,
            "--show-only",
            "templates/rbac.yaml",
            "--show-only",
            "templates/node-identity.yaml",
        ],
    );
    let f = c.dir.path().join("rbac.yaml");
    std::fs::write(&f, rendered).unwrap();
    c.kubectl_ok(&["apply", "-f", f.to_str().unwrap()]).unwrap();
}

#[test]
fn the_operator_and_nodes_do_their_whole_job_with_exactly_the_chart_rbac() {
    let c = KubeCluster::start().unwrap();
    apply_rbac_and_identity(&c);
    let op_kc = c
        .kubeconfig_with_token(&c.token_for(NS, "hb-operator").unwrap())
        .unwrap();
    // Each node its own credential: a token bound to its Kubernetes node, as its pod's is.
    let node_kc = |name: &str| {
        c.kubeconfig_with_token(&c.token_bound_to_node(NS, "hb-node", name).unwrap())
            .unwrap()
    };
    // A node credential cannot touch Workloads: RBAC is really on.
    let out = c.kubectl(&[
        "--kubeconfig",
        node_kc("n1").to_str().unwrap(),
        "get",
        "workloads",
    ]);
    assert!(!out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("forbidden"));

    let reg = Registry::start(false).unwrap();
    let image = push_busybox(&reg).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let token = write_token(dir.path()).unwrap();
    let pki = TestPki::new().unwrap();
    let node = |name: &str| {
        let n = start_node(
            &node_kc(name),
            name,
            &token,
            &[
                "--tls-cert",
                &pki.path("server.crt"),
                "--tls-key",
                &pki.path("server.key"),
                "--insecure-registry",
                &reg.addr,
            ],
        )
        .unwrap();
        c.wait_for(
            "hypernode",
            name,
            T,
            "registered with the node's own RBAC",
            |n| condition_is(n, "Ready", "True"),
        )
        .unwrap_or_else(|e| panic!("{e:#}\n{}", tail(&n.daemon_log(), 3000)));
        n
    };
    let n1 = node("n1");
    let mut n2 = node("n2");
    let hn = c.get("hypernode", "n1").unwrap();
    assert!(
        hn["spec"]["address"]
            .as_str()
            .unwrap()
            .starts_with("https://127.0.0.1:"),
        "{hn:#}"
    );
    let op = start_kube_operator(
        &op_kc,
        &token,
        dir.path(),
        &[
            "--lease-name",
            "hb-operator",
            "--lease-namespace",
            NS,
            "--node-ca",
            &pki.path("ca.crt"),
            "--node-monitor-grace",
            "5s",
            "--node-grace",
            "5s",
        ],
    )
    .unwrap();
    let yaml = format!(
        "apiVersion: hyperbox.dev/v1alpha1\nkind: Workload\nmetadata:\n  name: app\nspec:\n  image: {image}\n  command: [sleep, '1000']\n  replicas: 2\n  terminationGracePeriodSeconds: 0\n"
    );
    assert!(c.apply(&yaml).status.success());
    let ready = |what: &str, pred: &dyn Fn(&serde_json::Value) -> bool| {
        c.wait_for("workload", "app", T, what, |w| ready_now(w) && pred(w))
            .unwrap_or_else(|e| panic!("{e:#}\noperator log:\n{}", tail(&op.log_text(), 6000)))
    };
    ready("ready with the chart's RBAC", &|_| true);
    // The leader lease in the release namespace, by the name the Role allows.
    let lease = c
        .kubectl_ok(&["get", "lease", "hb-operator", "-n", NS, "-o", "name"])
        .unwrap();
    assert!(lease.contains("hb-operator"));
    c.kubectl_ok(&["scale", "workload/app", "--replicas=3"])
        .unwrap();
    ready("scaled", &|w| w["status"]["readyReplicas"] == 3);
    // Marking a dead node not ready (hypernodes/status), and events.
    n2.kill9();
    c.wait_for("hypernode", "n2", T, "n2 not ready", |n| {
        condition_is(n, "Ready", "False")
    })
    .unwrap_or_else(|e| panic!("{e:#}\noperator log:\n{}", tail(&op.log_text(), 6000)));
    ready("moved off n2", &|w| {
        w["status"]["nodes"] == "n1" && w["status"]["readyReplicas"] == 3
    });
    let events = c.kubectl_ok(&["get", "events", "-o", "json"]).unwrap();
    assert!(events.contains("\"Placed\""), "{events}");
    // Delete: the finalizer is removed (patch on workloads) after the containers stop.
    let out = c.kubectl(&["delete", "workload", "app", "--timeout=60s"]);
    assert!(
        out.status.success(),
        "{out:?}\n{}",
        tail(&op.log_text(), 6000)
    );
    assert!(n1.get("app").is_none());
    let log = op.log_text();
    assert!(!log.to_lowercase().contains("forbidden"), "{log}");
    assert!(!n1.daemon_log().to_lowercase().contains("forbidden"));
}

/// Server-side apply of HyperNode `name` (its status when `status`) as the user of
/// `kubeconfig`, as a node writes it.
fn apply_hypernode(
    c: &KubeCluster,
    kubeconfig: &Path,
    name: &str,
    status: bool,
) -> std::process::Output {
    let f = c
        .dir
        .path()
        .join(format!("hn-{name}-{}.yaml", random_suffix()));
    let body = if status {
        "status: {workloads: 7}".to_string()
    } else {
        format!("spec: {{address: 'https://127.0.0.1:1', nodeId: id-{name}}}")
    };
    std::fs::write(
        &f,
        format!("apiVersion: hyperbox.dev/v1alpha1\nkind: HyperNode\nmetadata: {{name: {name}}}\n{body}\n"),
    )
    .unwrap();
    let mut args = vec![
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
        "apply",
        "--server-side",
        "--field-manager=hyperbox-node",
        "-f",
        f.to_str().unwrap(),
    ];
    if status {
        args.push("--subresource=status");
    }
    c.kubectl(&args)
}

fn write_hypernode(c: &KubeCluster, kubeconfig: &Path, name: &str) -> std::process::Output {
    apply_hypernode(c, kubeconfig, name, false)
}

fn refused_saying(out: &std::process::Output, says: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "allowed: {out:?}");
    assert!(
        err.contains("Forbidden") || err.contains("forbidden"),
        "{err}"
    );
    assert!(err.contains(says), "{err}");
}

#[test]
fn a_node_writes_only_its_own_hypernode_under_the_charts_policy() {
    let c = KubeCluster::start().unwrap();
    apply_rbac_and_identity(&c);
    let kc = |token: String| c.kubeconfig_with_token(&token).unwrap();
    let n1 = kc(c.token_bound_to_node(NS, "hb-node", "n1").unwrap());
    let unbound = kc(c.token_for(NS, "hb-node").unwrap());
    let edge_a = kc(c.static_token("hyperbox:node:edge-a").unwrap());
    // The policy is enforced once the API server has loaded it: retry the first write a while.
    let mut allowed = write_hypernode(&c, &n1, "n1");
    for _ in 0..50 {
        if allowed.status.success() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
        allowed = write_hypernode(&c, &n1, "n1");
    }
    assert!(allowed.status.success(), "{allowed:?}");
    let mut other = write_hypernode(&c, &n1, "n2");
    for _ in 0..50 {
        if !other.status.success() {
            break;
        }
        // Not enforced yet: take the object away again and retry.
        c.kubectl_ok(&["delete", "hypernode", "n2"]).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        other = write_hypernode(&c, &n1, "n2");
    }
    refused_saying(&other, "node n1 may write only HyperNode n1, not n2");
    // Its own status, not another's (server-side apply of the status, as the node does).
    let status_patch = |kubeconfig: &Path, name: &str| apply_hypernode(&c, kubeconfig, name, true);
    let own = status_patch(&n1, "n1");
    assert!(own.status.success(), "{own:?}");
    // A ServiceAccount token that names no node writes nothing.
    refused_saying(&write_hypernode(&c, &unbound, "n1"), "names no node");
    // A node outside the cluster, by its user name.
    let edge = write_hypernode(&c, &edge_a, "edge-a");
    assert!(edge.status.success(), "{edge:?}");
    refused_saying(
        &write_hypernode(&c, &edge_a, "edge-b"),
        "node edge-a may write only HyperNode edge-a, not edge-b",
    );
    refused_saying(&status_patch(&edge_a, "n1"), "not n1");
    let out = c.kubectl(&[
        "--kubeconfig",
        edge_a.to_str().unwrap(),
        "delete",
        "hypernode",
        "n1",
    ]);
    assert!(!out.status.success(), "{out:?}");
    assert!(c.get("hypernode", "n1").is_some());
    // A node runtime started under another node's name never registers, and says why.
    let dir = tempfile::tempdir().unwrap();
    let token = write_token(dir.path()).unwrap();
    let n3 = start_node(&n1, "n3", &token, &[]).unwrap();
    wait_until(T, "the refusal in the node's log", || {
        n3.daemon_log()
            .contains("node n1 may write only HyperNode n1, not n3")
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", tail(&n3.daemon_log(), 3000)));
    assert!(c.get("hypernode", "n3").is_none());
}
