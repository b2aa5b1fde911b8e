//! End-to-end tests of edge GitOps: `hyperbox-operator git` against real Git repositories and
//! servers, reconciling onto a real `hyperbox-node`.

use std::time::{Duration, Instant};

use hyperbox_e2e::operator_fixtures::{operator_status_text, OperatorProcess, SilentServer};
use hyperbox_e2e::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(60);

fn start_node(reg: &Registry) -> Node {
    Node::start(&["--insecure-registry", &reg.addr, "--backoff-base", "200ms"]).unwrap()
}

/// A registry with the busybox image, a node using it, and an empty Git repository.
fn setup() -> (Registry, String, Node, GitRepo) {
    let reg = Registry::start(false).unwrap();
    let image = push_busybox(&reg).unwrap();
    let node = start_node(&reg);
    (reg, image, node, GitRepo::new().unwrap())
}

fn doc(name: &str, image: &str, cmd: &str) -> String {
    workload(
        name,
        image,
        &format!("  command: [sh, -c, '{cmd}']\n  terminationGracePeriodSeconds: 1\n"),
    )
}

fn outcome<'a>(status: &'a Value, name: &str) -> &'a str {
    status["workloads"]
        .as_array()
        .and_then(|a| a.iter().find(|w| w["name"] == name))
        .and_then(|w| w["outcome"].as_str())
        .unwrap_or("")
}

fn applied(status: &Value, rev: &str) -> bool {
    status["lastAppliedRevision"] == rev
}

/// Wait until the operator has recorded `n` more sync attempts than it had when `op` was
/// last seen: the event a negative check ("nothing changed") waits for instead of a sleep.
fn wait_more_syncs(op: &Operator, n: u64) -> Value {
    let start = op.status().and_then(|s| s["syncs"].as_u64()).unwrap_or(0);
    op.wait_status(T, "further sync attempts", |s| {
        s["syncs"].as_u64().unwrap_or(0) >= start + n
    })
    .unwrap()
}

#[test]
fn push_change_delete_is_reconciled() {
    let (_reg, image, node, repo) = setup();
    repo.write("apps/web.yaml", &doc("web", &image, "sleep 1000"));
    repo.write("apps/job.yaml", &doc("job", &image, "sleep 1000"));
    repo.write("README.md", "not a manifest");
    let rev1 = repo.commit_push("two workloads");
    let op = Operator::start(
        &node,
        &repo.url(),
        &["--path", "apps", "--interval", "500ms"],
    )
    .unwrap();

    let st = op
        .wait_status(T, "first sync", |s| applied(s, &rev1))
        .unwrap();
    assert_eq!(outcome(&st, "web"), "created");
    for n in ["web", "job"] {
        let v = node
            .wait_for(n, T, "running", |v| v["phase"] == "Running")
            .unwrap();
        assert_eq!(
            v["revision"],
            rev1.as_str(),
            "workloads carry the revision that produced them"
        );
    }
    let web1 = node.get("web").unwrap();

    // Change one: only it is replaced; the other keeps its container.
    let job1 = node.get("job").unwrap();
    repo.write("apps/web.yaml", &doc("web", &image, "sleep 2000"));
    let rev2 = repo.commit_push("change web");
    let st = op
        .wait_status(T, "second sync", |s| applied(s, &rev2))
        .unwrap();
    assert_eq!(outcome(&st, "web"), "updated");
    assert_eq!(outcome(&st, "job"), "unchanged");
    node.wait_for("web", T, "replaced", |v| {
        v["phase"] == "Running"
            && v["containerId"] != web1["containerId"]
            && !v["containerId"].is_null()
    })
    .unwrap();
    let job2 = node.get("job").unwrap();
    assert_eq!(
        job1["containerId"], job2["containerId"],
        "unchanged workload was restarted"
    );
    // It was not sent again: it keeps the revision of the commit that last changed it.
    assert_eq!(job2["revision"], rev1.as_str());

    // Delete one: pruned from the node.
    repo.remove("apps/job.yaml");
    let rev3 = repo.commit_push("remove job");
    let st = op
        .wait_status(T, "third sync", |s| applied(s, &rev3))
        .unwrap();
    assert_eq!(outcome(&st, "job"), "pruned");
    wait_until(T, "job gone", || node.get("job").is_none().then_some(())).unwrap();
    assert!(node.get("web").is_some());

    // Drift: deleted on the node behind the operator's back, restored at the next sync.
    assert!(node.cli(&["delete", "web"]).status.success());
    node.wait_for("web", T, "restored", |v| v["phase"] == "Running")
        .unwrap();
}

#[test]
fn broken_file_does_not_block_good_ones() {
    let (_reg, image, node, repo) = setup();
    repo.write("a.yaml", &doc("a", &image, "sleep 1000"));
    repo.write("b.yaml", &doc("b", &image, "sleep 1000"));
    repo.write("c.yaml", &doc("c", &image, "sleep 1000"));
    let rev1 = repo.commit_push("three");
    let op = Operator::start(&node, &repo.url(), &["--interval", "500ms"]).unwrap();
    op.wait_status(T, "first sync", |s| applied(s, &rev1))
        .unwrap();
    let c1 = node
        .wait_for("c", T, "c running", |v| v["phase"] == "Running")
        .unwrap();

    // One commit: a and b change (good), c gets an unknown field (bad), d is new but a
    // YAML syntax error, and e is a ConfigMap (not ours).
    repo.write("a.yaml", &doc("a", &image, "sleep 1001"));
    repo.write("b.yaml", &doc("b", &image, "sleep 1002"));
    repo.write(
        "c.yaml",
        &doc("c", &image, "sleep 1003").replace("  image:", "  imagePullPolicy: Always\n  image:"),
    );
    repo.write(
        "d.yaml",
        "apiVersion: hyperbox.dev/v1alpha1\nkind: Workload\nmetadata: {name: d\n",
    );
    repo.write(
        "e.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: e}\n",
    );
    let rev2 = repo.commit_push("mixed");
    let st = op
        .wait_status(T, "partial apply", |s| {
            s["lastFetchedRevision"] == rev2.as_str() && outcome(s, "a") == "updated"
        })
        .unwrap();
    assert_eq!(outcome(&st, "b"), "updated");
    assert_eq!(outcome(&st, "c"), "skipped");
    let problems: Vec<String> = st["files"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|f| {
            f["errors"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e.as_str().unwrap().to_string())
        })
        .collect();
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("c.yaml:6: spec.imagePullPolicy")),
        "{problems:?}"
    );
    assert!(
        problems.iter().any(|p| p.starts_with("d.yaml")),
        "{problems:?}"
    );
    assert_eq!(problems.len(), 2, "{problems:?}");
    let notes = st["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"] == "e.yaml")
        .unwrap()["notes"]
        .clone();
    assert!(notes.to_string().contains("ConfigMap"));
    // The good ones run their new spec; the broken one keeps its previous container.
    for n in ["a", "b"] {
        node.wait_for(n, T, "new spec", |v| {
            v["revision"] == rev2.as_str() && v["phase"] == "Running"
        })
        .unwrap();
    }
    let c2 = node.get("c").unwrap();
    assert_eq!(c1["containerId"], c2["containerId"]);
    assert_eq!(c2["revision"], rev1.as_str());

    // `validate` finds the same problems offline.
    let out = std::process::Command::new(bin("hyperbox-operator"))
        .arg("validate")
        .arg(&repo.work)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("c.yaml:6: spec.imagePullPolicy"), "{text}");
    assert!(text.contains("d.yaml"), "{text}");
}

#[test]
fn webhook_triggers_sync_and_refuses_bad_signatures() {
    let (_reg, image, node, repo) = setup();
    repo.write("w.yaml", &doc("w", &image, "sleep 1000"));
    let rev1 = repo.commit_push("one");
    let secret_file = node.dir.path().join("hook-secret");
    std::fs::write(&secret_file, "s3cr3t-hook\n").unwrap();
    // A long poll interval: only the webhook can make the second sync happen quickly. Port 0:
    // the kernel picks a free port, the log says which. No node watch: its wake-up after the
    // operator's own apply would be a second sync, and this counts syncs.
    let op = Operator::start(
        &node,
        &repo.url(),
        &[
            "--interval",
            "1h",
            "--node-watch",
            "false",
            "--webhook-listen",
            "127.0.0.1:0",
            "--webhook-secret-file",
            secret_file.to_str().unwrap(),
        ],
    )
    .unwrap();
    let hook = wait_until(T, "webhook listener address", || {
        logged_addr(&op.log_text(), "webhook receiver listening")
    })
    .unwrap();
    op.wait_status(T, "first sync", |s| applied(s, &rev1))
        .unwrap();
    wait_until(T, "webhook listener", || {
        std::net::TcpStream::connect(&hook).ok()
    })
    .unwrap();

    repo.write("w2.yaml", &doc("w2", &image, "sleep 1000"));
    let rev2 = repo.commit_push("two");
    let syncs_before = op.status().unwrap()["syncs"].as_u64().unwrap();
    let body = br#"{"ref":"refs/heads/main"}"#;
    assert_eq!(http_post(&hook, "/hook", &[], body), 401);
    assert_eq!(
        http_post(
            &hook,
            "/hook",
            &[("X-Hub-Signature-256", &webhook_signature(b"wrong", body))],
            body
        ),
        401
    );
    assert_eq!(
        http_post(
            &hook,
            "/hook",
            &[("X-Hub-Signature-256", "sha256=00")],
            body
        ),
        401
    );
    let st = op.status().unwrap();
    assert_eq!(
        st["lastAppliedRevision"],
        rev1.as_str(),
        "a refused webhook changed something"
    );
    assert!(node.get("w2").is_none());

    let status = http_post(
        &hook,
        "/hook",
        &[(
            "X-Hub-Signature-256",
            &webhook_signature(b"s3cr3t-hook", body),
        )],
        body,
    );
    assert_eq!(status, 202);
    let st = op
        .wait_status(Duration::from_secs(10), "webhook sync", |s| {
            applied(s, &rev2)
        })
        .unwrap();
    // Exactly one sync ran since the refused webhooks (the poll interval is an hour): the
    // signed one. The refused ones triggered nothing.
    assert_eq!(st["syncs"].as_u64().unwrap(), syncs_before + 1, "{st}");
    node.wait_for("w2", T, "w2 running", |v| v["phase"] == "Running")
        .unwrap();
    // The generic header works too.
    repo.write("w3.yaml", &doc("w3", &image, "sleep 1000"));
    let rev3 = repo.commit_push("three");
    assert_eq!(
        http_post(
            &hook,
            "/",
            &[("X-Signature-256", &webhook_signature(b"s3cr3t-hook", b"x"))],
            b"x"
        ),
        202
    );
    op.wait_status(Duration::from_secs(10), "generic webhook sync", |s| {
        applied(s, &rev3)
    })
    .unwrap();
}

#[test]
fn git_server_outage_keeps_workloads_running() {
    let (_reg, image, node, repo) = setup();
    repo.write("w.yaml", &doc("w", &image, "sleep 1000"));
    let rev1 = repo.commit_push("one");
    let mut daemon = GitDaemon::start(repo.dir.path(), None).unwrap();
    let url = format!("git://127.0.0.1:{}/remote.git", daemon.port);
    let op = Operator::start(&node, &url, &["--interval", "300ms"]).unwrap();
    op.wait_status(T, "first sync over git://", |s| applied(s, &rev1))
        .unwrap();
    let w1 = node
        .wait_for("w", T, "running", |v| v["phase"] == "Running")
        .unwrap();

    daemon.stop();
    let st = op.wait_status(T, "stale", |s| s["stale"] == true).unwrap();
    assert!(st["error"].as_str().unwrap().contains("fetch"), "{st}");
    // Several failed syncs into the outage, the container is untouched.
    wait_more_syncs(&op, 3);
    let w2 = node.get("w").unwrap();
    assert_eq!(
        w1["containerId"], w2["containerId"],
        "an outage must not touch running work"
    );
    assert_eq!(w2["phase"], "Running");

    // Work continues in Git meanwhile; the operator catches up when the server is back.
    repo.write("v.yaml", &doc("v", &image, "sleep 1000"));
    let rev2 = repo.commit_push("two");
    daemon.restart().unwrap();
    op.wait_status(T, "resumed", |s| s["stale"] == false && applied(s, &rev2))
        .unwrap();
    node.wait_for("v", T, "v running", |v| v["phase"] == "Running")
        .unwrap();
}

#[test]
fn operator_kill9_mid_sync_converges() {
    let (_reg, image, node, repo) = setup();
    for i in 0..40 {
        repo.write(
            &format!("w{i}.yaml"),
            &doc(&format!("w{i}"), &image, "sleep 1000")
                .replace("  command:", "  suspend: true\n  command:"),
        );
    }
    let rev1 = repo.commit_push("forty");
    let mut op = Operator::start(&node, &repo.url(), &["--interval", "300ms"]).unwrap();
    // Kill it as soon as it has started acting, then restart.
    wait_until(T, "first applies", || {
        let list: Vec<Value> =
            serde_json::from_slice(&node.cli(&["get", "-o", "json"]).stdout).ok()?;
        (!list.is_empty()).then_some(())
    })
    .unwrap();
    op.kill9();
    op.spawn().unwrap();
    op.wait_status(T, "converged", |s| applied(s, &rev1))
        .unwrap();
    let list: Vec<Value> =
        serde_json::from_slice(&node.cli(&["get", "-o", "json"]).stdout).unwrap();
    assert_eq!(list.len(), 40);
    // Prune still works for everything applied before the kill.
    for i in 0..40 {
        repo.remove(&format!("w{i}.yaml"));
    }
    repo.write(
        "keep.yaml",
        &doc("keep", &image, "sleep 1000").replace("  command:", "  suspend: true\n  command:"),
    );
    let rev2 = repo.commit_push("prune all but one");
    op.wait_status(T, "pruned", |s| applied(s, &rev2)).unwrap();
    let list: Vec<Value> =
        serde_json::from_slice(&node.cli(&["get", "-o", "json"]).stdout).unwrap();
    let names: Vec<&str> = list.iter().map(|w| w["name"].as_str().unwrap()).collect();
    assert_eq!(names, vec!["keep"]);
}

#[test]
fn thousand_workload_repo_converges() {
    let (_reg, image, node, repo) = setup();
    // Suspended workloads: the sync path at scale (parse, diff, apply, records) without
    // starting a thousand containers on a CI box.
    for i in 0..1000 {
        repo.write(
            &format!("apps/{:02}/w{i}.yaml", i % 20),
            &doc(&format!("w{i}"), &image, "sleep 1000")
                .replace("  command:", "  suspend: true\n  command:"),
        );
    }
    let rev = repo.commit_push("a thousand");
    let op = Operator::start(&node, &repo.url(), &["--interval", "1s"]).unwrap();
    let st = op
        .wait_status(Duration::from_secs(120), "converged", |s| applied(s, &rev))
        .unwrap();
    assert_eq!(st["workloads"].as_array().unwrap().len(), 1000);
    let list: Vec<Value> =
        serde_json::from_slice(&node.cli(&["get", "-o", "json"]).stdout).unwrap();
    assert_eq!(list.len(), 1000);
    assert!(list
        .iter()
        .all(|w| w["revision"] == rev.as_str() && w["suspended"] == true));
    // The next sync of the same revision is a no-change sync.
    wait_more_syncs(&op, 1);
    assert!(
        op.log_text().contains("no change"),
        "{}",
        tail(&op.log_text(), 2000)
    );
}

#[test]
fn http_source_with_token_auth() {
    let (_reg, image, node, repo) = setup();
    repo.write("w.yaml", &doc("w", &image, "sleep 1000"));
    let rev = repo.commit_push("one");
    let server = GitHttpServer::start(repo.dir.path(), Some("fleet:tok-5e3c7")).unwrap();
    let url = format!("http://127.0.0.1:{}/remote.git", server.port);

    // No credentials: the fetch fails and says so; nothing is applied.
    let anon = Operator::start(&node, &url, &["--interval", "300ms"]).unwrap();
    let st = anon
        .wait_status(T, "auth failure", |s| s["error"].is_string())
        .unwrap();
    assert!(st["lastAppliedRevision"].is_null());
    assert!(node.get("w").is_none());
    drop(anon);

    let token = node.dir.path().join("git-token");
    std::fs::write(&token, "tok-5e3c7\n").unwrap();
    let op = Operator::start(
        &node,
        &url,
        &[
            "--interval",
            "300ms",
            "--username",
            "fleet",
            "--token-file",
            token.to_str().unwrap(),
        ],
    )
    .unwrap();
    op.wait_status(T, "sync over http with a token", |s| applied(s, &rev))
        .unwrap();
    node.wait_for("w", T, "running", |v| v["phase"] == "Running")
        .unwrap();
}

#[test]
fn unsigned_heads_are_refused_when_signatures_are_required() {
    let (_reg, image, node, repo) = setup();
    let key = repo.dir.path().join("signing-key");
    let out = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "signer", "-f"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pubkey = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    let signers = repo.dir.path().join("allowed_signers");
    std::fs::write(&signers, format!("test@hyperbox.invalid {}", pubkey.trim())).unwrap();
    repo.git(&["config", "gpg.format", "ssh"]).unwrap();
    repo.git(&["config", "user.signingkey", key.to_str().unwrap()])
        .unwrap();

    repo.write("w.yaml", &doc("w", &image, "sleep 1000"));
    repo.git(&["add", "-A"]).unwrap();
    repo.git(&["commit", "-q", "-S", "-m", "signed"]).unwrap();
    repo.git(&["push", "-q", "origin", "main"]).unwrap();
    let signed = repo.git(&["rev-parse", "HEAD"]).unwrap();

    let op = Operator::start(
        &node,
        &repo.url(),
        &[
            "--interval",
            "300ms",
            "--verify-signatures",
            signers.to_str().unwrap(),
        ],
    )
    .unwrap();
    op.wait_status(T, "signed head applied", |s| applied(s, &signed))
        .unwrap();
    node.wait_for("w", T, "running", |v| v["phase"] == "Running")
        .unwrap();

    // An unsigned commit on top: refused, nothing changes on the node.
    repo.write("v.yaml", &doc("v", &image, "sleep 1000"));
    let unsigned = repo.commit_push("unsigned");
    let st = op
        .wait_status(T, "refusal", |s| {
            s["lastFetchedRevision"] == unsigned.as_str() && s["error"].is_string()
        })
        .unwrap();
    assert!(
        st["error"].as_str().unwrap().contains("no valid signature"),
        "{st}"
    );
    assert_eq!(st["lastAppliedRevision"], signed.as_str());
    let st = wait_more_syncs(&op, 2);
    assert_eq!(st["lastAppliedRevision"], signed.as_str());
    assert!(node.get("v").is_none());
}

#[test]
fn ssh_source_checks_the_host_key() {
    let (_reg, image, node, repo) = setup();
    repo.write("w.yaml", &doc("w", &image, "sleep 1000"));
    let rev = repo.commit_push("one");
    let ssh = SshServer::start().unwrap();
    let url = ssh.url(&repo.bare);
    let key = ssh.client_key.to_str().unwrap();

    // A known_hosts entry with another key: refused before anything is fetched.
    let other = ssh.dir.path().join("other_known_hosts");
    let wrong_key = ssh.dir.path().join("wrong");
    let out = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&wrong_key)
        .output()
        .unwrap();
    assert!(out.status.success());
    let wrong_pub = std::fs::read_to_string(wrong_key.with_extension("pub")).unwrap();
    let mut p = wrong_pub.split_whitespace();
    std::fs::write(
        &other,
        format!(
            "[127.0.0.1]:{} {} {}\n",
            ssh.port,
            p.next().unwrap(),
            p.next().unwrap()
        ),
    )
    .unwrap();
    let bad = Operator::start(
        &node,
        &url,
        &[
            "--interval",
            "300ms",
            "--ssh-key",
            key,
            "--known-hosts",
            other.to_str().unwrap(),
        ],
    )
    .unwrap();
    let st = bad
        .wait_status(T, "host key refusal", |s| s["error"].is_string())
        .unwrap();
    assert!(st["error"].as_str().unwrap().contains("host key"), "{st}");
    assert!(node.get("w").is_none());
    drop(bad);

    let op = Operator::start(
        &node,
        &url,
        &[
            "--interval",
            "300ms",
            "--ssh-key",
            key,
            "--known-hosts",
            ssh.known_hosts.to_str().unwrap(),
        ],
    )
    .unwrap();
    op.wait_status(T, "sync over ssh", |s| applied(s, &rev))
        .unwrap();
    node.wait_for("w", T, "running", |v| v["phase"] == "Running")
        .unwrap();
}

#[test]
fn tag_and_commit_pins() {
    let (_reg, image, node, repo) = setup();
    repo.write("w.yaml", &doc("w", &image, "sleep 1000"));
    let v1 = repo.commit_push("v1");
    repo.git(&["tag", "v1"]).unwrap();
    repo.git(&["push", "-q", "origin", "v1"]).unwrap();
    repo.write("later.yaml", &doc("later", &image, "sleep 1000"));
    let head = repo.commit_push("after v1");

    // Pinned to the tag: HEAD moved on, the node runs what v1 says.
    let tagged =
        Operator::start(&node, &repo.url(), &["--tag", "v1", "--interval", "300ms"]).unwrap();
    tagged
        .wait_status(T, "tag synced", |s| applied(s, &v1))
        .unwrap();
    assert!(node.get("later").is_none());
    drop(tagged);

    // Pinned to a commit: a commit made after it does not move the node.
    let pinned = Operator::start(
        &node,
        &repo.url(),
        &["--commit", &head, "--interval", "300ms"],
    )
    .unwrap();
    pinned
        .wait_status(T, "commit synced", |s| applied(s, &head))
        .unwrap();
    node.wait_for("later", T, "later running", |v| v["phase"] == "Running")
        .unwrap();
    repo.write("newest.yaml", &doc("newest", &image, "sleep 1000"));
    repo.commit_push("after the pin");
    let st = wait_more_syncs(&pinned, 2);
    assert_eq!(st["lastAppliedRevision"], head.as_str());
    assert!(node.get("newest").is_none());
}

fn error_of(status: &Value) -> &str {
    status["error"].as_str().unwrap_or("")
}

/// A node endpoint nobody listens on: these syncs fail before they reach the node.
fn no_node(dir: &std::path::Path) -> String {
    format!("unix://{}", dir.join("no-node.sock").display())
}

#[test]
fn git_fetch_from_a_silent_server_times_out() {
    let dir = tempfile::tempdir().unwrap();
    for scheme in ["git", "http"] {
        let silent = SilentServer::start().unwrap();
        let url = format!("{scheme}://{}/remote.git", silent.addr());
        let started = Instant::now();
        let op = OperatorProcess::start(
            dir.path(),
            &no_node(dir.path()),
            &url,
            &["--interval", "300ms", "--git-timeout", "2s"],
        )
        .unwrap();
        let st = op
            .wait_status(Duration::from_secs(20), "a timed-out fetch", |s| {
                error_of(s).contains("timed out")
            })
            .unwrap();
        let took = started.elapsed();
        assert!(took < Duration::from_secs(15), "{scheme}: {took:?}");
        assert!(
            silent.accepted() >= 1,
            "{scheme}: the fetch never connected"
        );
        let error = error_of(&st);
        assert!(error.contains("fetch") && error.contains(&url), "{error}");
        assert!(error.contains("--git-timeout"), "{error}");
        assert_eq!(st["stale"], true);
        assert!(st["consecutiveFailures"].as_u64().unwrap() >= 1, "{st}");
        let text = operator_status_text(&op.state);
        assert!(
            text.contains("timed out") && text.contains("failing:"),
            "{text}"
        );
    }
}

#[test]
fn sigterm_stops_the_operator_during_a_hung_fetch() {
    let dir = tempfile::tempdir().unwrap();
    let silent = SilentServer::start().unwrap();
    // Default Git timeouts (60 s): the fetch is still waiting when SIGTERM comes.
    let mut op = OperatorProcess::start(
        dir.path(),
        &no_node(dir.path()),
        &format!("git://{}/remote.git", silent.addr()),
        &["--interval", "300ms"],
    )
    .unwrap();
    wait_until(T, "the fetch to connect", || {
        (silent.accepted() > 0).then_some(())
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(op.wait_exit(Duration::ZERO).is_none(), "{}", op.log_text());
    let signalled = Instant::now();
    op.sigterm();
    let exit = op.wait_exit(Duration::from_secs(10));
    let took = signalled.elapsed();
    let exit =
        exit.unwrap_or_else(|| panic!("still running 10 s after SIGTERM\n{}", op.log_text()));
    assert!(took < Duration::from_secs(5), "{took:?}");
    // It handled the signal (a clean exit), rather than dying of it.
    assert!(exit.success(), "{exit:?}\n{}", op.log_text());
    assert!(op.log_text().contains("terminated"), "{}", op.log_text());
}

#[test]
fn unwritable_inventory_fails_the_sync_in_status_and_backs_off() {
    let (_reg, image, node, repo) = setup();
    let suspended =
        |n: &str| doc(n, &image, "sleep 1000").replace("  command:", "  suspend: true\n  command:");
    repo.write("a.yaml", &suspended("a"));
    let rev1 = repo.commit_push("one");
    let op = Operator::start(&node, &repo.url(), &["--interval", "5s"]).unwrap();
    op.wait_status(T, "first sync", |s| applied(s, &rev1))
        .unwrap();

    // A directory where the inventory goes: the next sync cannot record what it will own.
    let inventory = op.state.join("inventory.json");
    std::fs::remove_file(&inventory).unwrap();
    std::fs::create_dir(&inventory).unwrap();
    repo.write("b.yaml", &suspended("b"));
    let rev2 = repo.commit_push("two");
    let st = op
        .wait_status(T, "three failed syncs", |s| {
            s["consecutiveFailures"].as_u64() >= Some(3)
        })
        .unwrap();
    assert!(error_of(&st).contains("inventory.json"), "{st}");
    assert_eq!(st["stale"], true);
    assert_eq!(st["lastFetchedRevision"], rev2.as_str());
    assert_eq!(st["lastAppliedRevision"], rev1.as_str());
    assert!(
        node.get("b").is_none(),
        "applied without recording the inventory"
    );
    let text = operator_status_text(&op.state);
    assert!(
        text.contains("inventory.json") && text.contains("failing:"),
        "{text}"
    );
    // Retries back off: the third failure waits at least 2 s (4 s, jittered down by half).
    let log = op.log_text();
    let delays: Vec<u64> = log
        .lines()
        .filter(|l| l.contains("sync failed"))
        .filter_map(|l| {
            l.split("retry_in_ms=")
                .nth(1)?
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect();
    assert!(delays.len() >= 3, "{}", tail(&log, 3000));
    assert!(delays[0] <= 1000 && delays[2] >= 2000, "{delays:?}");

    std::fs::remove_dir(&inventory).unwrap();
    let st = op
        .wait_status(T, "recovered", |s| applied(s, &rev2))
        .unwrap();
    assert_eq!(st["consecutiveFailures"], 0);
    assert_eq!(st["stale"], false);
    assert!(st["error"].is_null());
    assert!(node.get("b").is_some());
}

#[test]
fn large_workloads_are_applied_within_the_node_body_cap() {
    let (_reg, image, node, repo) = setup();
    // 500 workloads with ~20 KiB of env each: ~10 MiB of apply, over the node's 4 MiB cap
    // for one request. Suspended: the sync path, without 500 containers.
    let env: String = (0..10)
        .map(|i| format!("  - name: V{i}\n    value: {}\n", "v".repeat(2048)))
        .collect();
    for i in 0..500 {
        repo.write(
            &format!("apps/w{i}.yaml"),
            &workload(
                &format!("w{i}"),
                &image,
                &format!("  suspend: true\n  env:\n{env}"),
            ),
        );
    }
    // One workload that alone is over the cap (a 500 KiB value, anchored and repeated ten
    // times by YAML aliases: ~5 MiB as JSON). It is reported and never blocks the others.
    let big = "h".repeat(500 << 10);
    let mut huge_env = format!("  - name: V0\n    value: &big {big}\n");
    for i in 1..10 {
        huge_env.push_str(&format!("  - name: V{i}\n    value: *big\n"));
    }
    repo.write(
        "apps/huge.yaml",
        &workload(
            "huge",
            &image,
            &format!("  suspend: true\n  env:\n{huge_env}"),
        ),
    );
    let rev = repo.commit_push("large workloads");
    let op = Operator::start(&node, &repo.url(), &["--interval", "2s"]).unwrap();
    let st = op
        .wait_status(Duration::from_secs(180), "applied", |s| applied(s, &rev))
        .unwrap();
    assert!(st["error"].is_null(), "{}", error_of(&st));
    assert_eq!(st["workloads"].as_array().unwrap().len(), 501);
    // Created, or `unchanged` if a retry of the refused one (or the node watch after the
    // apply) synced again already.
    assert!(
        matches!(outcome(&st, "w499"), "created" | "unchanged"),
        "{st}"
    );
    assert_eq!(outcome(&st, "huge"), "failed");
    let huge = st["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == "huge")
        .unwrap();
    let msg = huge["message"].as_str().unwrap();
    assert!(
        msg.contains("workload huge is") && msg.contains("MiB") && msg.contains("not applied"),
        "{msg}"
    );
    let list: Vec<Value> =
        serde_json::from_slice(&node.cli(&["get", "-o", "json"]).stdout).unwrap();
    assert_eq!(list.len(), 500);
    assert!(list
        .iter()
        .all(|w| w["revision"] == rev.as_str() && w["suspended"] == true));
    assert!(node.get("huge").is_none());
    // The batches fit the node's cap: none had to be split after a 413.
    assert!(
        !op.log_text().contains("refused the batch as too large"),
        "{}",
        tail(&op.log_text(), 2000)
    );
}

#[test]
fn a_workload_the_node_refuses_does_not_block_the_others() {
    let (_reg, image, node, repo) = setup();
    repo.write("a.yaml", &doc("a", &image, "sleep 1000"));
    repo.write("b.yaml", &doc("b", &image, "sleep 1000"));
    // Valid YAML, but this node does not allow host paths outside its volumes dir.
    repo.write(
        "c.yaml",
        &workload(
            "c",
            &image,
            "  command: [sleep, '1000']\n  volumes: [{name: h, hostPath: {path: /etc}}]\n  mounts: [{name: h, mountPath: /h}]\n",
        ),
    );
    let rev = repo.commit_push("one refused");
    let op = Operator::start(&node, &repo.url(), &["--interval", "500ms"]).unwrap();
    let st = op
        .wait_status(T, "sync with a refusal", |s| {
            // The refused one is retried at every sync (and the node watch wakes one after
            // the apply), after which the others read `unchanged`.
            matches!(outcome(s, "a"), "created" | "unchanged") && outcome(s, "c") == "failed"
        })
        .unwrap();
    assert!(matches!(outcome(&st, "b"), "created" | "unchanged"), "{st}");
    let c = st["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == "c")
        .unwrap();
    assert!(
        c["message"]
            .as_str()
            .unwrap_or("")
            .contains("hostPath.path"),
        "{c}"
    );
    for n in ["a", "b"] {
        node.wait_for(n, T, "running", |v| v["phase"] == "Running")
            .unwrap();
    }
    assert!(node.get("c").is_none());
    // Good workloads count as applied at this revision.
    assert!(node.get("a").unwrap()["revision"] == rev.as_str());
}

#[test]
fn scaling_in_git_keeps_survivors_and_scale_drift_is_restored() {
    let (_reg, image, node, repo) = setup();
    let doc_n = |n: u32| {
        doc("w", &image, "sleep 1000")
            .replace("  command:", &format!("  replicas: {n}\n  command:"))
    };
    let ids = |v: &Value| -> Vec<String> {
        v["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["containerId"].as_str().unwrap_or("").to_string())
            .collect()
    };
    let running = |n: usize| {
        move |v: &Value| {
            let r = v["replicas"].as_array().unwrap();
            r.len() == n && r.iter().all(|x| x["phase"] == "Running")
        }
    };
    repo.write("w.yaml", &doc_n(2));
    let rev1 = repo.commit_push("two");
    let op = Operator::start(&node, &repo.url(), &["--interval", "300ms"]).unwrap();
    op.wait_status(T, "first sync", |s| applied(s, &rev1))
        .unwrap();
    let two = ids(&node.wait_for("w", T, "2 running", running(2)).unwrap());
    repo.write("w.yaml", &doc_n(3));
    let rev2 = repo.commit_push("three");
    op.wait_status(T, "scaled in git", |s| applied(s, &rev2))
        .unwrap();
    let three = ids(&node.wait_for("w", T, "3 running", running(3)).unwrap());
    assert_eq!(&three[..2], &two[..], "scaling up restarted a survivor");
    // Someone scales it down on the node, keeping the revision: drift, restored at the next
    // sync, and the survivor is still the same container.
    let drifted = node.apply(&doc_n(1).replace(
        "  name: w\n",
        &format!("  name: w\n  annotations: {{hyperbox.dev/revision: {rev2}}}\n"),
    ));
    assert!(drifted.status.success());
    let back = ids(&node.wait_for("w", T, "restored to 3", running(3)).unwrap());
    assert_eq!(back[0], two[0]);
    let st = op.status().unwrap();
    assert_eq!(outcome(&st, "w"), "restored", "{st}");
}

#[test]
fn two_git_operators_share_a_node_without_touching_each_other() {
    let (_reg, image, node, repo_a) = setup();
    let repo_b = GitRepo::new().unwrap();
    repo_a.write("a1.yaml", &doc("a1", &image, "sleep 1000"));
    repo_a.write("shared.yaml", &doc("shared", &image, "sleep 1001"));
    let rev_a = repo_a.commit_push("a");
    repo_b.write("b1.yaml", &doc("b1", &image, "sleep 1000"));
    repo_b.write("shared.yaml", &doc("shared", &image, "sleep 1002"));
    let rev_b = repo_b.commit_push("b");
    let op_a = Operator::start(&node, &repo_a.url(), &["--interval", "300ms"]).unwrap();
    op_a.wait_status(T, "a applied", |s| applied(s, &rev_a))
        .unwrap();
    let op_b = Operator::start(&node, &repo_b.url(), &["--interval", "300ms"]).unwrap();
    // B applies its own workload; the shared name belongs to A and is refused for B (and
    // retried at every sync, after which b1 reads `unchanged`).
    let st = op_b
        .wait_status(T, "b synced with a conflict", |s| {
            matches!(outcome(s, "b1"), "created" | "unchanged") && outcome(s, "shared") == "failed"
        })
        .unwrap();
    let shared = st["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == "shared")
        .unwrap();
    let owner_a = format!("git:{}", repo_a.url());
    assert!(
        shared["message"].as_str().unwrap().contains(&owner_a),
        "{shared}"
    );
    let v = node
        .wait_for("shared", T, "shared running", |v| v["phase"] == "Running")
        .unwrap();
    assert_eq!(v["manager"], owner_a.as_str());
    assert_eq!(v["revision"], rev_a.as_str(), "B changed A's workload");
    node.wait_for("b1", T, "b1 running", |v| v["phase"] == "Running")
        .unwrap();
    // A's repository empties: A prunes its own workloads only.
    repo_a.remove("a1.yaml");
    repo_a.remove("shared.yaml");
    let rev_a2 = repo_a.commit_push("empty");
    op_a.wait_status(T, "a pruned", |s| applied(s, &rev_a2))
        .unwrap();
    assert!(node.get("a1").is_none());
    let b1 = node.get("b1").expect("A pruned B's workload");
    assert_eq!(b1["manager"], format!("git:{}", repo_b.url()).as_str());
    // The name is free now: B's next sync creates its own version of it.
    let v = node
        .wait_for("shared", T, "shared now B's", |v| {
            v["manager"] == format!("git:{}", repo_b.url()).as_str() && v["phase"] == "Running"
        })
        .unwrap();
    assert_eq!(v["revision"], rev_b.as_str());
}

#[test]
fn namespaces_in_git_are_separate_workloads() {
    let (_reg, image, node, repo) = setup();
    let in_ns = |ns: &str, name: &str, cmd: &str| {
        doc(name, &image, cmd).replacen(
            "metadata:\n",
            &format!("metadata:\n  namespace: {ns}\n"),
            1,
        )
    };
    repo.write("web.yaml", &doc("web", &image, "sleep 1000"));
    repo.write("team-a.yaml", &in_ns("team-a", "web", "sleep 1001"));
    // The same key twice (an explicit default namespace is the default namespace) is a
    // duplicate; the same name in another namespace is not.
    repo.write("dup.yaml", &in_ns("default", "web", "sleep 1002"));
    let rev = repo.commit_push("namespaces");
    let op = Operator::start(&node, &repo.url(), &["--interval", "300ms"]).unwrap();
    let st = op.wait_status(T, "synced", |s| applied(s, &rev)).unwrap();
    assert_eq!(outcome(&st, "team-a/web"), "created", "{st:#}");
    assert_eq!(outcome(&st, "web"), "skipped", "a duplicated key: {st:#}");
    let errors = st.to_string();
    assert!(errors.contains("defined more than once"), "{st:#}");
    let a = node
        .wait_for("team-a/web", T, "team-a/web running", |v| {
            v["phase"] == "Running"
        })
        .unwrap();
    assert_eq!(a["namespace"], "team-a");
    assert!(node.get("web").is_none());
    // Fixing the duplicate creates web; removing team-a's file prunes only team-a/web.
    repo.remove("dup.yaml");
    repo.remove("team-a.yaml");
    let rev2 = repo.commit_push("one web");
    let st = op
        .wait_status(T, "synced again", |s| applied(s, &rev2))
        .unwrap();
    assert_eq!(outcome(&st, "web"), "created", "{st:#}");
    assert_eq!(outcome(&st, "team-a/web"), "pruned", "{st:#}");
    node.wait_for("web", T, "web running", |v| v["phase"] == "Running")
        .unwrap();
    wait_until(T, "team-a/web pruned", || {
        node.get("team-a/web").is_none().then_some(())
    })
    .unwrap();
}

/// With the node watch (the default), drift is repaired when it happens, not at the next
/// poll: the interval here is an hour. Without it (`--node-watch false`) the same drift waits
/// for the poll.
#[test]
fn the_node_watch_repairs_drift_between_polls() {
    let (_reg, image, node, repo) = setup();
    repo.write("w.yaml", &doc("w", &image, "sleep 1000"));
    let rev = repo.commit_push("one");
    let op = Operator::start(
        &node,
        &repo.url(),
        &["--interval", "1h", "--node-watch-timeout", "2s"],
    )
    .unwrap();
    let st = op
        .wait_status(T, "first sync", |s| applied(s, &rev))
        .unwrap();
    assert_eq!(st["nodeObservation"], "watch");
    let first = node
        .wait_for("w", T, "w running", |v| v["phase"] == "Running")
        .unwrap();
    // Deleted by hand: the watch wakes the operator, which restores it.
    let started = std::time::Instant::now();
    let out = node.cli(&["delete", "w"]);
    assert!(out.status.success());
    let back = node
        .wait_for(
            "w",
            Duration::from_secs(20),
            "w restored by the watch",
            |v| v["phase"] == "Running" && container_ids(v) != container_ids(&first),
        )
        .unwrap();
    assert!(!container_ids(&back).is_empty());
    op.wait_status(T, "restore recorded", |s| outcome(s, "w") == "restored")
        .unwrap();
    eprintln!("drift repaired by the watch in {:?}", started.elapsed());
    drop(op);

    // Polling: the same drift waits for the next poll (an hour away).
    let op = Operator::start(
        &node,
        &repo.url(),
        &["--interval", "1h", "--node-watch", "false"],
    )
    .unwrap();
    op.wait_status(T, "first sync", |s| s["nodeObservation"] == "poll")
        .unwrap();
    let out = node.cli(&["delete", "w"]);
    assert!(out.status.success());
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        node.get("w").is_none(),
        "restored without a watch or a poll"
    );
    drop(op);

    // What a quiet node costs over a dozen syncs 300 ms apart: a poll lists at every sync, a
    // watch answers about once per timeout (2 s).
    let quiet_requests = |watch: &str| {
        let op = Operator::start(
            &node,
            &repo.url(),
            &[
                "--interval",
                "300ms",
                "--node-watch",
                watch,
                "--node-watch-timeout",
                "2s",
            ],
        )
        .unwrap();
        let count = |s: &Value| s["nodeApi"]["requests"].as_u64().unwrap_or(0);
        let st = op
            .wait_status(T, "settled", |s| applied(s, &rev) && s["error"].is_null())
            .unwrap();
        let (syncs, before) = (st["syncs"].as_u64().unwrap(), count(&st));
        let st = op
            .wait_status(T, "a dozen more syncs", |s| {
                s["syncs"].as_u64().unwrap() >= syncs + 12
            })
            .unwrap();
        let took = (st["syncs"].as_u64().unwrap() - syncs, count(&st) - before);
        eprintln!(
            "node-watch {watch}: {} requests over {} syncs",
            took.1, took.0
        );
        took
    };
    let (syncs, polled) = quiet_requests("false");
    assert!(
        polled >= syncs,
        "polling lists at every sync: {polled} over {syncs}"
    );
    let (syncs, watched) = quiet_requests("true");
    assert!(
        watched <= 6,
        "{watched} requests over {syncs} quiet syncs with a watch"
    );
}
