//! End-to-end tests of `hyperbox-operator init`: a real Git repository is checked and the
//! operator's config file written only when it is reachable and every manifest is valid; the
//! operator then runs from that file alone (`git --config FILE`) onto a real node.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use hyperbox_e2e::*;

const T: Duration = Duration::from_secs(60);

fn operator(args: &[&str]) -> Output {
    Command::new(bin("hyperbox-operator"))
        .args(args)
        .output()
        .expect("run hyperbox-operator")
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn doc(name: &str, image: &str) -> String {
    workload(
        name,
        image,
        "  command: [sh, -c, 'sleep 1000']\n  terminationGracePeriodSeconds: 1\n",
    )
}

#[test]
fn init_writes_a_config_the_operator_syncs_from() {
    let reg = Registry::start(false).unwrap();
    let image = push_busybox(&reg).unwrap();
    let node = Node::start(&["--insecure-registry", &reg.addr]).unwrap();
    let repo = GitRepo::new().unwrap();
    repo.write("apps/web.yaml", &doc("web", &image));
    repo.write("README.md", "not a manifest");
    let rev = repo.commit_push("one workload");
    // A directory that does not exist yet, like /etc/hyperbox before the package.
    let config = node.dir.path().join("etc/hyperbox/operator.toml");
    let sock = format!("unix://{}", node.socket.display());
    let init_args = [
        "init",
        "--repo",
        &repo.url(),
        "--branch",
        "main",
        "--path",
        "apps",
        "--node",
        &sock,
        "--config",
        config.to_str().unwrap(),
    ];
    let out = operator(&init_args);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "init failed: {stdout}{stderr}");
    assert!(
        stdout.contains(&rev[..12]) && stdout.contains("1 workload(s)"),
        "{stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.trim() == format!("{:<30} apps/web.yaml", "web").trim()),
        "{stdout}"
    );
    let mode = std::fs::metadata(&config).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644);
    let written = std::fs::read_to_string(&config).unwrap();
    assert!(
        written.contains(&format!("repo = \"{}\"", repo.url())),
        "{written}"
    );

    // A second init does not replace it without --force.
    let out = operator(&init_args);
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!("{} exists: pass --force", config.display())),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(&config).unwrap(), written);

    // The operator runs from the file; the state dir is a flag on top of it.
    let state = node.dir.path().join("operator-state");
    let op = Operator::start_with_args(
        state.clone(),
        &[
            "git",
            "--config",
            config.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
            "--interval",
            "500ms",
        ],
    )
    .unwrap();
    op.wait_status(T, "the revision init checked is applied", |s| {
        s["lastAppliedRevision"] == rev.as_str()
    })
    .unwrap();
    let w = node
        .wait_for("web", T, "web running", |v| v["phase"] == "Running")
        .unwrap();
    assert_eq!(w["revision"], rev.as_str());
    let manager = format!("git:{}#apps", repo.url());
    assert_eq!(w["manager"], manager.as_str(), "{w:#}");
}

#[test]
fn init_refuses_a_repo_with_an_invalid_manifest_and_writes_nothing() {
    let repo = GitRepo::new().unwrap();
    repo.write("edge/good.yaml", &doc("good", "r.example/a:1"));
    // Line 7 is the bad field.
    repo.write(
        "edge/bad.yaml",
        &workload("bad", "r.example/a:1", "  replicas: lots\n"),
    );
    repo.commit_push("one good, one bad");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("operator.toml");
    let out = operator(&[
        "init",
        "--repo",
        &repo.url(),
        "--path",
        "edge",
        "--config",
        config.to_str().unwrap(),
    ]);
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "init passed: {stdout}{stderr}");
    assert!(
        stdout.contains("edge/bad.yaml:7: spec.replicas:"),
        "the problem names the file and line: {stdout}"
    );
    assert!(
        stderr.contains("1 problem(s) in the manifests") && stderr.contains("not written"),
        "{stderr}"
    );
    assert!(!config.exists(), "a config was written");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn init_reports_an_unreachable_repo_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("operator.toml");
    let missing = format!("file://{}", dir.path().join("no-such-repo.git").display());
    let refused = format!("git://127.0.0.1:{}/site.git", free_port());
    for url in [&missing, &refused] {
        let out = operator(&["init", "--repo", url, "--config", config.to_str().unwrap()]);
        let (stdout, stderr) = text(&out);
        assert!(
            !out.status.success(),
            "init passed for {url}: {stdout}{stderr}"
        );
        assert!(
            stderr.starts_with("error: the repository is not reachable: ") && stderr.contains(url),
            "{stderr}"
        );
        assert!(!Path::new(&config).exists());
    }
}
