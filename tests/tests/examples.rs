//! The example workloads (examples/edge/apps, the files Argo CD syncs and kubectl applies in
//! the kube tests) run from a Git repository in edge mode. Only the image host changes: the
//! examples name the demo's registry (127.0.0.1:5050); the test pushes the same image to a
//! registry on a free port and rewrites that one prefix.

use std::time::Duration;

use hyperbox_e2e::*;

const T: Duration = Duration::from_secs(90);
const DEMO_REGISTRY: &str = "127.0.0.1:5050";

#[test]
fn every_example_workload_runs_from_a_git_repo_in_edge_mode() {
    let reg = Registry::start(false).unwrap();
    let (image, _) = push_image(
        &reg,
        "hyperbox/busybox",
        "demo",
        vec![(busybox_layer().finish(), Compress::Gzip)],
        &[],
        &["sh"],
    )
    .unwrap();
    assert_eq!(image, format!("{}/hyperbox/busybox:demo", reg.addr));
    let node = Node::start(&[
        "--insecure-registry",
        &reg.addr,
        "--allow-host-path",
        "/etc/os-release",
    ])
    .unwrap();
    let repo = GitRepo::new().unwrap();
    let apps = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/edge/apps");
    let mut names = Vec::new();
    for e in std::fs::read_dir(&apps).unwrap().flatten() {
        let text = std::fs::read_to_string(e.path()).unwrap();
        assert!(text.contains(DEMO_REGISTRY), "{}", e.path().display());
        let file = e.file_name().to_string_lossy().to_string();
        names.push(file.trim_end_matches(".yaml").to_string());
        repo.write(
            &format!("apps/{file}"),
            &text.replace(DEMO_REGISTRY, &reg.addr),
        );
    }
    names.sort();
    assert_eq!(names, ["hello", "web", "worker"]);
    let rev = repo.commit_push("the examples");
    let op = Operator::start(
        &node,
        &repo.url(),
        &["--path", "apps", "--interval", "500ms"],
    )
    .unwrap();
    let st = op
        .wait_status(T, "the examples applied", |s| {
            s["lastAppliedRevision"] == rev.as_str()
        })
        .unwrap();
    let files = st["files"].as_array().unwrap();
    assert!(
        files
            .iter()
            .all(|f| f["errors"].as_array().unwrap().is_empty()),
        "{st:#}"
    );
    node.wait_for("hello", T, "hello ran to completion", |v| {
        v["phase"] == "Succeeded"
    })
    .unwrap();
    node.wait_for("web", T, "web ready", |v| v["ready"] == true)
        .unwrap();
    node.wait_for("worker", T, "both worker replicas ready", |v| {
        v["readyReplicas"] == 2
    })
    .unwrap();
    let logs = node.cli(&["logs", "hello"]);
    assert!(
        String::from_utf8_lossy(&logs.stdout).contains("hello from"),
        "{logs:?}"
    );
}
