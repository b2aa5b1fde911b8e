//! The node's own policy, enforced whatever a manifest says: hostPath allow-list, no
//! CAP_NET_RAW by default, and a seccomp allow-list. Real containers; needs root and gcc.

use std::collections::BTreeMap;
use std::fs;
use std::process::Command;
use std::time::Duration;

use hyperbox_e2e::*;

const T: Duration = Duration::from_secs(60);

/// The confinement probe (tests/support/confine_probe.c), built static.
fn probe_binary(dir: &std::path::Path) -> Vec<u8> {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("support/confine_probe.c");
    let out = dir.join("confine_probe");
    let st = Command::new("gcc")
        .args(["-static", "-O1", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .expect("run gcc");
    assert!(st.success(), "gcc failed");
    fs::read(out).unwrap()
}

fn results(log: &str) -> BTreeMap<String, i32> {
    log.lines()
        .filter_map(|l| l.split_once('='))
        .filter_map(|(k, v)| Some((k.to_string(), v.trim().parse().ok()?)))
        .collect()
}

fn run_probe(extra_node_args: &[&str]) -> BTreeMap<String, i32> {
    let reg = Registry::start(false).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bin = probe_binary(dir.path());
    let (image, _) = push_image(
        &reg,
        "confine",
        "1",
        vec![(
            busybox_layer()
                .file("bin/confine_probe", &bin, 0o755)
                .finish(),
            Compress::Gzip,
        )],
        &[],
        &["/bin/confine_probe"],
    )
    .unwrap();
    let mut args = vec!["--insecure-registry", reg.addr.as_str()];
    args.extend_from_slice(extra_node_args);
    let node = Node::start(&args).unwrap();
    node.apply(&workload("probe", &image, "  network: none\n"));
    node.wait_for("probe", T, "running", |v| v["phase"] == "Running")
        .unwrap();
    let mut got = BTreeMap::new();
    wait_until(T, "all probe results", || {
        let out = node.cli(&["logs", "probe"]);
        got = results(&String::from_utf8_lossy(&out.stdout));
        got.contains_key("raw_socket").then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {got:?}\n{}", tail(&node.daemon_log(), 3000)));
    got
}

#[test]
fn seccomp_and_capabilities_confine_containers() {
    let r = run_probe(&[]);
    let eperm = libc::EPERM;
    for call in [
        "unshare_user",
        "unshare_mount",
        "clone_newnet",
        "io_uring_setup",
        "bpf",
        "perf_event_open",
        "keyctl",
        "add_key",
        "mount_setattr",
    ] {
        assert_eq!(r[call], eperm, "{call} must fail with EPERM: {r:?}");
    }
    assert_eq!(r["clone3"], libc::ENOSYS, "{r:?}");
    assert_eq!(r["clone_plain"], 0, "a plain fork works: {r:?}");
    // No CAP_NET_RAW by default.
    assert_eq!(r["raw_socket"], eperm, "{r:?}");
}

#[test]
fn net_raw_is_granted_only_when_the_node_allows_it() {
    let r = run_probe(&["--allow-net-raw"]);
    assert_eq!(r["raw_socket"], 0, "{r:?}");
    // The rest of the profile still holds.
    assert_eq!(r["unshare_user"], libc::EPERM, "{r:?}");
}

#[test]
fn host_paths_outside_the_allow_list_are_refused() {
    let reg = Registry::start(false).unwrap();
    let image = push_busybox(&reg).unwrap();
    let allowed = tempfile::tempdir().unwrap();
    fs::write(allowed.path().join("f"), "ok\n").unwrap();
    // A symlink inside the allowed dir that points out of it.
    std::os::unix::fs::symlink("/etc", allowed.path().join("escape")).unwrap();
    let node = Node::start(&[
        "--insecure-registry",
        &reg.addr,
        "--allow-host-path",
        allowed.path().to_str().unwrap(),
    ])
    .unwrap();
    let vol = |path: &str| {
        format!(
            "  command: [sleep, '1000']\n  volumes: [{{name: h, hostPath: {{path: '{path}'}}}}]\n  mounts: [{{name: h, mountPath: /h}}]\n"
        )
    };
    // Refused at admission, with the field and the rule.
    let f = node.dir.path().join("etc.yaml");
    fs::write(&f, workload("etc", &image, &vol("/etc"))).unwrap();
    let out = node.cli(&["apply", "--no-wait", "-f", f.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("spec.volumes[0].hostPath.path"), "{err}");
    assert!(err.contains("--allow-host-path"), "{err}");
    assert!(node.get("etc").is_none());
    let dotdot = format!("{}/../../etc", allowed.path().display());
    fs::write(&f, workload("dotdot", &image, &vol(&dotdot))).unwrap();
    assert!(!node
        .cli(&["apply", "--no-wait", "-f", f.to_str().unwrap()])
        .status
        .success());
    // Allowed paths work.
    node.apply(&workload(
        "ok",
        &image,
        &vol(allowed.path().to_str().unwrap()),
    ));
    node.wait_for("ok", T, "running", |v| v["phase"] == "Running")
        .unwrap();
    // A symlink out of the allowed dir passes admission (it is only a path there) but is
    // refused when the container is built, with symlinks resolved.
    node.apply(&workload(
        "escape",
        &image,
        &vol(&format!("{}/escape", allowed.path().display())),
    ));
    let v = node
        .wait_for("escape", T, "refused", |v| {
            v["reason"] == "CreateContainerError"
        })
        .unwrap();
    assert!(
        v["message"].as_str().unwrap().contains("resolves to /etc"),
        "{v}"
    );
}
