//! The Argo CD health check (examples/argocd/argocd-cm.yaml) run in gopher-lua, the Lua VM
//! Argo CD embeds, against the statuses the operator really writes for each state. Argo CD
//! itself cannot be built here (its module does not build on this machine: see STACK.md).

use std::time::Duration;

use hyperbox_e2e::kube::*;
use hyperbox_e2e::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(90);

/// The Lua of `resource.customizations.health.hyperbox.dev_Workload`, as users copy it.
fn health_lua() -> String {
    let cm = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/argocd/argocd-cm.yaml"),
    )
    .unwrap();
    let key = "resource.customizations.health.hyperbox.dev_Workload: |\n";
    let start = cm.find(key).expect("the health check key") + key.len();
    cm[start..]
        .lines()
        .take_while(|l| l.starts_with("    ") || l.is_empty())
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
}

fn health(c: &KubeCluster, obj: &Value) -> (String, String) {
    let lua = c.dir.path().join("health.lua");
    std::fs::write(&lua, health_lua()).unwrap();
    let f = c.dir.path().join(format!("obj-{}.json", random_suffix()));
    std::fs::write(&f, obj.to_string()).unwrap();
    let out = std::process::Command::new(c.dir.path().join("bin/argolua"))
        .arg(&lua)
        .arg(&f)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    (
        v["status"].as_str().unwrap().to_string(),
        v["message"].as_str().unwrap().to_string(),
    )
}

#[test]
fn the_argo_cd_health_check_maps_each_state_the_operator_writes() {
    let c = KubeCluster::start().unwrap();
    let reg = Registry::start(false).unwrap();
    let image = push_busybox(&reg).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let token = write_token(dir.path()).unwrap();
    let _n1 = start_node(
        &c.kubeconfig,
        "n1",
        &token,
        &["--insecure-registry", &reg.addr],
    )
    .unwrap();
    let doc = |name: &str, extra: &str| {
        format!(
            "apiVersion: hyperbox.dev/v1alpha1\nkind: Workload\nmetadata:\n  name: {name}\nspec:\n  image: {image}\n  command: [sleep, '1000']\n  terminationGracePeriodSeconds: 0\n{extra}"
        )
    };
    // Before the operator ever saw it: Progressing.
    assert!(c.apply(&doc("healthy", "")).status.success());
    let fresh = c.get("workload", "healthy").unwrap();
    assert_eq!(health(&c, &fresh).0, "Progressing");
    let op = start_kube_operator(&c.kubeconfig, &token, dir.path(), &[]).unwrap();
    let wait = |name: &str, what: &str, pred: &dyn Fn(&Value) -> bool| -> Value {
        c.wait_for("workload", name, T, what, |w| pred(w))
            .unwrap_or_else(|e| panic!("{e:#}\n{}", tail(&op.log_text(), 6000)))
    };
    let w = wait("healthy", "ready", &|w| ready_now(w));
    assert_eq!(health(&c, &w).0, "Healthy", "{w:#}");

    assert!(c
        .apply(&doc("sleeping", "  suspend: true\n"))
        .status
        .success());
    let w = wait("sleeping", "suspended", &|w| {
        condition(w, "Ready").is_some_and(|(_, r)| r == "Suspended")
    });
    assert_eq!(health(&c, &w).0, "Suspended", "{w:#}");

    let huge = "  resources: {requests: {memory: 4000Gi}}\n";
    assert!(c.apply(&doc("huge", huge)).status.success());
    let w = wait("huge", "stalled", &|w| condition_is(w, "Stalled", "True"));
    let (status, message) = health(&c, &w);
    assert_eq!(status, "Degraded", "{w:#}");
    assert!(message.contains("InsufficientMemory"), "{message}");
    // ...and a Warning event says so.
    let events = c.kubectl_ok(&["get", "events", "-o", "json"]).unwrap();
    assert!(events.contains("FailedPlacement"), "{events}");

    let never_ready = "  readinessProbe: {exec: {command: ['false']}, periodSeconds: 1}\n";
    assert!(c.apply(&doc("starting", never_ready)).status.success());
    let w = wait("starting", "running but not ready", &|w| {
        w["status"]["replicas"] == 1 && condition_is(w, "Reconciling", "True")
    });
    assert_eq!(health(&c, &w).0, "Progressing", "{w:#}");

    // A new generation the operator has not acted on yet reads Progressing, not Healthy.
    let mut stale = c.get("workload", "healthy").unwrap();
    stale["metadata"]["generation"] = Value::from(2);
    assert_eq!(health(&c, &stale).0, "Progressing");
}
