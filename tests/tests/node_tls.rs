//! The node API over TCP with TLS (and optionally mTLS): real certificates from a throwaway
//! CA, the real CLI as the client. Needs root (the node) and openssl.

use std::time::Duration;

use hyperbox_e2e::*;

const T: Duration = Duration::from_secs(60);

fn tls_node(reg: &Registry, pki: &TestPki, token: &str, mtls: bool) -> (Node, String) {
    let token_file = pki.dir.path().join("token");
    std::fs::write(&token_file, token).unwrap();
    let mut args = vec![
        "--insecure-registry".to_string(),
        reg.addr.clone(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--token-file".into(),
        token_file.to_string_lossy().into_owned(),
        "--tls-cert".into(),
        pki.path("server.crt"),
        "--tls-key".into(),
        pki.path("server.key"),
    ];
    if mtls {
        args.extend(["--client-ca".into(), pki.path("ca.crt")]);
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let node = Node::start(&refs).unwrap();
    let addr = wait_until(T, "tls listener address", || {
        logged_addr(&node.daemon_log(), "node api listening on tcp")
    })
    .unwrap();
    (node, addr)
}

/// The CLI against a remote node: `--server URL --token-file F` plus `extra`.
fn remote(pki: &TestPki, url: &str, extra: &[&str], args: &[&str]) -> std::process::Output {
    std::process::Command::new(bin("hyperbox-node"))
        .args(["--server", url, "--token-file"])
        .arg(pki.dir.path().join("token"))
        .args(extra)
        .args(args)
        .output()
        .unwrap()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn tls_api_works_and_refuses_plain_http_and_unknown_cas() {
    let reg = Registry::start(false).unwrap();
    let image = push_busybox(&reg).unwrap();
    let pki = TestPki::new().unwrap();
    let (node, addr) = tls_node(&reg, &pki, "a-token-of-some-length-1234", false);
    let https = format!("https://{addr}");
    let ca = pki.path("ca.crt");
    // Apply and read back over TLS with the bearer token.
    let f = pki.dir.path().join("w.yaml");
    std::fs::write(
        &f,
        workload("remote", &image, "  command: [sleep, '1000']\n"),
    )
    .unwrap();
    let out = remote(
        &pki,
        &https,
        &["--ca-file", &ca],
        &["apply", "-f", f.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    node.wait_for("remote", T, "running", |v| v["phase"] == "Running")
        .unwrap();
    let out = remote(
        &pki,
        &https,
        &["--ca-file", &ca],
        &["get", "remote", "-o", "json"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    // Plain HTTP to the TLS port: a clear answer, in plain HTTP.
    let out = remote(&pki, &format!("http://{addr}"), &[], &["get"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("this port speaks TLS"),
        "{}",
        stderr(&out)
    );
    // A CA that did not sign the node's certificate.
    let out = remote(
        &pki,
        &https,
        &["--ca-file", &pki.path("other-ca.crt")],
        &["get"],
    );
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(
        e.contains("tls handshake") && e.contains("not signed by --ca-file"),
        "{e}"
    );
    // No CA at all.
    let out = remote(&pki, &https, &[], &["get"]);
    assert!(stderr(&out).contains("needs --ca-file"), "{}", stderr(&out));
    // The token is still required over TLS.
    let out = std::process::Command::new(bin("hyperbox-node"))
        .args(["--server", &https, "--ca-file", &ca, "get"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("401"), "{}", stderr(&out));
}

#[test]
fn mtls_requires_a_client_certificate_from_the_ca() {
    let reg = Registry::start(false).unwrap();
    let pki = TestPki::new().unwrap();
    let (_node, addr) = tls_node(&reg, &pki, "another-token-of-length-5678", true);
    let https = format!("https://{addr}");
    let ca = pki.path("ca.crt");
    let out = remote(&pki, &https, &["--ca-file", &ca], &["node", "-o", "json"]);
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(e.contains("requires a client certificate"), "{e}");
    let client = [
        "--ca-file",
        ca.as_str(),
        "--cert",
        &pki.path("client.crt"),
        "--key",
        &pki.path("client.key"),
    ];
    let out = remote(&pki, &https, &client, &["node", "-o", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // A certificate the node's CA did not sign is refused: the server certificate of the other
    // CA would do, but the simplest stranger is a self-signed CA certificate used as a client.
    let stranger = [
        "--ca-file",
        ca.as_str(),
        "--cert",
        &pki.path("other-ca.crt"),
        "--key",
        &pki.path("other-ca.key"),
    ];
    let out = remote(&pki, &https, &stranger, &["node", "-o", "json"]);
    assert!(
        !out.status.success(),
        "a stranger's certificate was accepted"
    );
}

#[test]
fn the_git_operator_drives_a_node_over_mtls() {
    let reg = Registry::start(false).unwrap();
    let image = push_busybox(&reg).unwrap();
    let pki = TestPki::new().unwrap();
    let (node, addr) = tls_node(&reg, &pki, "operator-token-of-length-42", true);
    let repo = GitRepo::new().unwrap();
    repo.write(
        "w.yaml",
        &workload("via-tls", &image, "  command: [sleep, '1000']\n"),
    );
    let rev = repo.commit_push("one");
    let op = operator_fixtures::OperatorProcess::start(
        pki.dir.path(),
        &format!("https://{addr}"),
        &repo.url(),
        &[
            "--node-token-file",
            pki.dir.path().join("token").to_str().unwrap(),
            "--node-ca-file",
            &pki.path("ca.crt"),
            "--node-cert",
            &pki.path("client.crt"),
            "--node-key",
            &pki.path("client.key"),
            "--interval",
            "500ms",
        ],
    )
    .unwrap();
    op.wait_status(T, "applied over mtls", |s| {
        s["lastAppliedRevision"] == rev.as_str()
    })
    .unwrap();
    node.wait_for("via-tls", T, "running", |v| v["phase"] == "Running")
        .unwrap();
}
