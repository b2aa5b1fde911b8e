//! A real Kubernetes control plane for the tests (`tests/kube/cluster.sh`: etcd and
//! kube-apiserver built from the Go modules), kubectl against it, and the HyperBox pieces
//! that run against it: nodes that register as HyperNodes and the operator's `kubernetes`
//! mode.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::{json_of, random_suffix, wait_for_value, Node, Operator};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The CRDs as generated into the repository.
pub fn crds_file() -> PathBuf {
    repo_root().join("crds/hyperbox.yaml")
}

pub struct KubeCluster {
    pub dir: tempfile::TempDir,
    pub kubeconfig: PathBuf,
    pub kubectl: PathBuf,
}

impl KubeCluster {
    /// Start etcd and the API server (building them the first time), and install the CRDs.
    pub fn start() -> Result<KubeCluster> {
        let c = KubeCluster::start_bare()?;
        c.kubectl_ok(&["apply", "-f", crds_file().to_str().unwrap()])?;
        c.kubectl_ok(&[
            "wait",
            "--for",
            "condition=established",
            "--timeout=60s",
            "crd/workloads.hyperbox.dev",
            "crd/hypernodes.hyperbox.dev",
        ])?;
        Ok(c)
    }

    /// Start etcd and the API server without installing anything.
    pub fn start_bare() -> Result<KubeCluster> {
        let dir = tempfile::Builder::new().prefix("hbkube").tempdir()?;
        let out = Command::new(repo_root().join("tests/kube/cluster.sh"))
            .arg("up")
            .arg(dir.path())
            .output()
            .context("run tests/kube/cluster.sh up")?;
        if !out.status.success() {
            bail!(
                "cluster.sh up failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(KubeCluster {
            kubeconfig: dir.path().join("kubeconfig"),
            kubectl: dir.path().join("bin/kubectl"),
            dir,
        })
    }

    /// Stop the API server and start it again on the same port and etcd data.
    pub fn restart_apiserver(&self) -> Result<()> {
        let out = Command::new(repo_root().join("tests/kube/cluster.sh"))
            .arg("restart-apiserver")
            .arg(self.dir.path())
            .output()?;
        if !out.status.success() {
            bail!(
                "cluster.sh restart-apiserver failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    pub fn kubectl(&self, args: &[&str]) -> Output {
        Command::new(&self.kubectl)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run kubectl")
    }

    /// kubectl that must succeed; its stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.kubectl(args);
        if !out.status.success() {
            bail!(
                "kubectl {} failed: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    }

    /// `kubectl apply -f -` of a YAML text.
    pub fn apply(&self, yaml: &str) -> Output {
        let f = self
            .dir
            .path()
            .join(format!("apply-{}.yaml", random_suffix()));
        fs::write(&f, yaml).unwrap();
        self.kubectl(&["apply", "-f", f.to_str().unwrap()])
    }

    /// An object as JSON, if it exists.
    pub fn get(&self, kind: &str, name: &str) -> Option<Value> {
        json_of(&self.kubectl(&["get", kind, name, "-o", "json"]))
    }

    /// Wait until `pred` holds for the object; the error shows the last state seen.
    pub fn wait_for(
        &self,
        kind: &str,
        name: &str,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        wait_for_value(
            timeout,
            what,
            || self.get(kind, name),
            pred,
            |last| format!("last {kind}/{name}: {last:#}"),
        )
    }

    /// A token for a ServiceAccount (the TokenRequest API, as a pod would get).
    pub fn token_for(&self, namespace: &str, sa: &str) -> Result<String> {
        Ok(self
            .kubectl_ok(&["create", "token", sa, "-n", namespace, "--duration=2h"])?
            .trim()
            .to_string())
    }

    /// A token for a ServiceAccount bound to the Node `node` (created here if missing): the
    /// API server adds the node's name to its requests, as it does for a pod's token on that
    /// node.
    pub fn token_bound_to_node(&self, namespace: &str, sa: &str, node: &str) -> Result<String> {
        let out = self.apply(&format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: {node}}}\n"
        ));
        anyhow::ensure!(out.status.success(), "create node {node}: {out:?}");
        Ok(self
            .kubectl_ok(&[
                "create",
                "token",
                sa,
                "-n",
                namespace,
                "--duration=2h",
                "--bound-object-kind",
                "Node",
                "--bound-object-name",
                node,
            ])?
            .trim()
            .to_string())
    }

    /// The static token of `user` (cluster.sh gives hyperbox:node:edge-a and
    /// hyperbox:node:edge-b their own).
    pub fn static_token(&self, user: &str) -> Result<String> {
        let tokens = fs::read_to_string(self.dir.path().join("tokens.csv"))?;
        tokens
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split(',').collect();
                (f.get(1) == Some(&user)).then(|| f[0].to_string())
            })
            .ok_or_else(|| anyhow::anyhow!("no static token for {user}"))
    }

    /// A kubeconfig that authenticates with `token` instead of the admin's.
    pub fn kubeconfig_with_token(&self, token: &str) -> Result<PathBuf> {
        let admin = fs::read_to_string(&self.kubeconfig)?;
        let mut out = String::new();
        for line in admin.lines() {
            if line.trim_start().starts_with("token:") {
                out.push_str(&format!("    token: {token}\n"));
            } else {
                out.push_str(line);
                out.push('\n');
            }
        }
        let path = self
            .dir
            .path()
            .join(format!("kubeconfig-{}", random_suffix()));
        fs::write(&path, out)?;
        Ok(path)
    }
}

impl Drop for KubeCluster {
    fn drop(&mut self) {
        let _ = Command::new(repo_root().join("tests/kube/cluster.sh"))
            .arg("down")
            .arg(self.dir.path())
            .output();
    }
}

/// The condition `kind` of an object's status: (status, reason).
pub fn condition(obj: &Value, kind: &str) -> Option<(String, String)> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
        .map(|c| {
            (
                c["status"].as_str().unwrap_or_default().to_string(),
                c["reason"].as_str().unwrap_or_default().to_string(),
            )
        })
}

/// Whether the object's condition `kind` has status `status` (`True`, `False`).
pub fn condition_is(obj: &Value, kind: &str, status: &str) -> bool {
    condition(obj, kind).is_some_and(|(s, _)| s == status)
}

/// `Ready=True` at the object's current generation.
pub fn ready_now(obj: &Value) -> bool {
    condition_is(obj, "Ready", "True")
        && obj["status"]["observedGeneration"] == obj["metadata"]["generation"]
}

/// A node runtime that registers as HyperNode `name` with the API server of `kubeconfig` (TCP
/// listener with a token, heartbeats every second).
pub fn start_node(
    kubeconfig: &Path,
    name: &str,
    token_file: &Path,
    extra: &[&str],
) -> Result<Node> {
    let listen = format!("127.0.0.1:{}", crate::free_port());
    let token = token_file.display().to_string();
    let mut args = vec![
        "--listen",
        &listen,
        "--token-file",
        &token,
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
        "--node-name",
        name,
        "--heartbeat-interval",
        "1s",
    ];
    args.extend_from_slice(extra);
    Node::start(&args)
}

/// A token file for the nodes' APIs (mode 0600).
pub fn write_token(dir: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(format!("node-token-{}", random_suffix()));
    fs::write(&path, format!("hyperbox-test-token-{}", random_suffix()))?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
    Ok(path)
}

/// `hyperbox-operator kubernetes` against the cluster of `kubeconfig`, reaching the nodes with
/// `token_file`; its state dir (where its log is) is a new directory under `dir`.
pub fn start_kube_operator(
    kubeconfig: &Path,
    token_file: &Path,
    dir: &Path,
    extra: &[&str],
) -> Result<Operator> {
    start_kube_operator_wrapped(kubeconfig, token_file, dir, &[], extra)
}

/// [`start_kube_operator`] under `wrapper` (see [`Operator::start_wrapped`]).
pub fn start_kube_operator_wrapped(
    kubeconfig: &Path,
    token_file: &Path,
    dir: &Path,
    wrapper: &[&str],
    extra: &[&str],
) -> Result<Operator> {
    let kubeconfig = kubeconfig.display().to_string();
    let token = token_file.display().to_string();
    let mut args = vec![
        "kubernetes",
        "--kubeconfig",
        &kubeconfig,
        "--node-token-file",
        &token,
    ];
    // The test nodes serve plain http (the chart's serve https).
    if !extra.contains(&"--https-nodes-only") {
        args.push("--allow-http-nodes");
    }
    let extra: Vec<&str> = extra
        .iter()
        .copied()
        .filter(|a| *a != "--https-nodes-only")
        .collect();
    args.extend_from_slice(&extra);
    Operator::start_wrapped(
        dir.join(format!("operator-{}", random_suffix())),
        wrapper,
        &args,
    )
}
