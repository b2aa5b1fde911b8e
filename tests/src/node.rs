//! A real `hyperbox-node` daemon in its own state dir, socket and cgroup parent, and what
//! the tests read of it.

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::*;

/// A running `hyperbox-node serve` with its own state dir, socket and cgroup parent.
pub struct Node {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub state: PathBuf,
    pub cgroup_parent: String,
    pub extra: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl Node {
    pub fn start(extra: &[&str]) -> Result<Node> {
        Self::start_with_env(extra, &[])
    }

    pub fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Result<Node> {
        let dir = tempfile::Builder::new().prefix("hbnode").tempdir()?;
        let mut n = Node {
            child: None,
            socket: dir.path().join("node.sock"),
            state: dir.path().join("state"),
            cgroup_parent: format!("/hyperbox-test-{}", random_suffix()),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            dir,
        };
        n.spawn()?;
        Ok(n)
    }

    pub fn spawn(&mut self) -> Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("daemon.log"))?;
        let child = Command::new(bin("hyperbox-node"))
            .arg("--socket")
            .arg(&self.socket)
            .arg("serve")
            .arg("--state-dir")
            .arg(&self.state)
            .arg("--run-dir")
            .arg(self.dir.path().join("run"))
            .arg("--cgroup-parent")
            .arg(&self.cgroup_parent)
            .args(&self.extra)
            .env(
                "RUST_LOG",
                "info,hyperbox_node=debug,libcgroups=error,libcontainer=warn",
            )
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start hyperbox-node")?;
        self.child = Some(child);
        let sock = self.socket.clone();
        wait_until(Duration::from_secs(30), "node socket", || {
            std::os::unix::net::UnixStream::connect(&sock).ok()
        })
        .with_context(|| self.daemon_log())?;
        Ok(())
    }

    /// Pid of the running daemon.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    pub fn daemon_log(&self) -> String {
        fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Wait until `workload`'s container log (`logs WORKLOAD`) contains `text`.
    pub fn wait_for_log(&self, workload: &str, text: &str, timeout: Duration) -> Result<()> {
        wait_until(timeout, &format!("{workload} logging {text:?}"), || {
            let out = self.cli(&["logs", workload]);
            String::from_utf8_lossy(&out.stdout)
                .contains(text)
                .then_some(())
        })
    }

    /// Run the CLI against this node.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin("hyperbox-node"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run hyperbox-node client")
    }

    /// The v2 directory of a container of this node (its cgroup parent for ""): under the
    /// unified tree of a hybrid host, or the root of a pure v2 host; none without a v2 tree.
    pub fn v2_dir(&self, container: &str) -> Option<PathBuf> {
        Some(
            v2_root()?
                .join(self.cgroup_parent.trim_start_matches('/'))
                .join(container),
        )
    }

    /// `node -o json`: capacity, allocations, pressure, features; panics when it fails.
    pub fn node_json(&self) -> Value {
        let out = self.cli(&["node", "-o", "json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Apply YAML text; panics with the output when it fails.
    pub fn apply(&self, yaml: &str) -> Output {
        let f = self
            .dir
            .path()
            .join(format!("apply-{}.yaml", random_suffix()));
        fs::write(&f, yaml).unwrap();
        self.cli(&["apply", "--no-wait", "-f", f.to_str().unwrap()])
    }

    /// The status of workload `name` (namespace default) straight from the node's API: fast
    /// enough to sample every few milliseconds.
    pub fn status_now(&self, name: &str) -> Option<Value> {
        let out = http_over_unix(
            &self.socket,
            "GET",
            &format!("/v1/workloads/default/{name}"),
            "",
        );
        if !out.starts_with("HTTP/1.1 200") {
            return None;
        }
        serde_json::from_str(out.split("\r\n\r\n").nth(1)?).ok()
    }

    pub fn get(&self, name: &str) -> Option<Value> {
        json_of(&self.cli(&["get", name, "-o", "json"]))
    }

    pub fn wait_for(
        &self,
        name: &str,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        wait_for_value(
            timeout,
            what,
            || self.get(name),
            pred,
            |last| {
                format!(
                    "last status of {name}: {last:#}\ndaemon log:\n{}",
                    tail(&self.daemon_log(), 4000)
                )
            },
        )
    }

    /// Mount points under this node's state dir.
    pub fn mounts(&self) -> Vec<String> {
        let state = self.state.to_string_lossy().to_string();
        fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(|s| s.to_string()))
            .filter(|m| m.starts_with(&state))
            .collect()
    }

    /// cgroup directories of this node's containers, over all hierarchies.
    pub fn cgroups(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let rel = self.cgroup_parent.trim_start_matches('/');
        for c in fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
            if let Ok(entries) = fs::read_dir(c.path().join(rel)) {
                for e in entries.flatten() {
                    if e.path().is_dir() {
                        out.push(e.path());
                    }
                }
            }
        }
        out.sort();
        out
    }

    /// Pids of processes inside this node's containers (from the pids cgroups).
    pub fn container_pids(&self) -> Vec<i32> {
        let mut pids = Vec::new();
        for cg in self.cgroups() {
            if let Ok(t) = fs::read_to_string(cg.join("cgroup.procs")) {
                pids.extend(t.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
            }
        }
        pids.sort();
        pids.dedup();
        pids
    }
}

/// The cgroup v2 tree: the unified tree of a hybrid host or the root of a pure v2 host; none
/// without one.
pub fn v2_root() -> Option<PathBuf> {
    if fs::metadata("/sys/fs/cgroup/cgroup.controllers").is_ok() {
        Some(PathBuf::from("/sys/fs/cgroup"))
    } else if fs::metadata("/sys/fs/cgroup/unified/cgroup.controllers").is_ok() {
        Some(PathBuf::from("/sys/fs/cgroup/unified"))
    } else {
        None
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // Tests that care about orderly deletion do it themselves; here the daemon goes away and
        // whatever is left (containers keep running by design) is torn down by hand.
        self.kill9();
        for pid in self.container_pids() {
            // SAFETY: plain kill.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(100));
        let mut mounts = self.mounts();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            let c = std::ffi::CString::new(m).unwrap();
            // SAFETY: umount2 with a valid C string.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
        // A cgroup can only go once its last process has exited, a moment after SIGKILL:
        // retry for up to 2 s rather than leak it.
        let rel = self.cgroup_parent.trim_start_matches('/').to_string();
        let parents = || -> Vec<PathBuf> {
            fs::read_dir("/sys/fs/cgroup")
                .unwrap()
                .flatten()
                .map(|c| c.path().join(&rel))
                .filter(|p| p.exists())
                .collect()
        };
        for _ in 0..20 {
            for cg in self.cgroups() {
                let _ = fs::remove_dir(cg);
            }
            for p in parents() {
                let _ = fs::remove_dir(p);
            }
            if parents().is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A Workload document.
pub fn workload(name: &str, image: &str, extra_spec: &str) -> String {
    format!(
        "apiVersion: hyperbox.dev/v1alpha1\nkind: Workload\nmetadata:\n  name: {name}\nspec:\n  image: {image}\n{extra_spec}"
    )
}

/// Container ids of every replica in a workload status (`get -o json`).
pub fn container_ids(status: &Value) -> Vec<String> {
    status["replicas"]
        .as_array()
        .map(|r| {
            r.iter()
                .filter_map(|r| r["containerId"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// What sampling a rollout across nodes saw (see [`sample_rollout`]).
#[derive(Debug)]
pub struct RolloutSamples {
    /// The fewest ready replicas of the workload, over all its nodes, held over two samples
    /// in a row. One round reads the nodes one after another, so a node that finishes between
    /// two reads could show as down on one node and already released on the next: a dip seen
    /// once is that, a real one (a node rolls for a second or more) lasts many samples.
    pub fewest_ready: u64,
    pub samples: usize,
    /// When each node finished its part (a new spec, all replicas updated and ready, no old
    /// one left), from the start.
    pub done_at: Vec<Duration>,
}

/// Sample workload `name` on every node every 20 ms until each runs a spec other than
/// `old_spec_hash` to completion with `per_node` replicas; fails after `timeout`.
pub fn sample_rollout(
    nodes: &[&Node],
    name: &str,
    old_spec_hash: &Value,
    per_node: u64,
    timeout: Duration,
) -> Result<RolloutSamples> {
    let started = Instant::now();
    let mut fewest_ready = u64::MAX;
    let mut last: Option<u64> = None;
    let mut samples = 0;
    let mut done_at: Vec<Option<Duration>> = vec![None; nodes.len()];
    loop {
        if started.elapsed() > timeout {
            bail!("the rollout of {name} did not finish in {timeout:?}: nodes done at {done_at:?}");
        }
        let states: Vec<Option<Value>> = nodes.iter().map(|n| n.status_now(name)).collect();
        let ready: u64 = states
            .iter()
            .map(|s| {
                s.as_ref()
                    .map_or(0, |s| s["readyReplicas"].as_u64().unwrap_or(0))
            })
            .sum();
        if let Some(previous) = last {
            fewest_ready = fewest_ready.min(previous.max(ready));
        }
        last = Some(ready);
        samples += 1;
        for (i, st) in states.iter().enumerate() {
            let done = st.as_ref().is_some_and(|s| {
                &s["specHash"] != old_spec_hash
                    && s["readyReplicas"] == per_node
                    && s["updatedReplicas"] == per_node
                    && s["currentReplicas"] == per_node
            });
            if done && done_at[i].is_none() {
                done_at[i] = Some(started.elapsed());
            }
        }
        if done_at.iter().all(Option::is_some) {
            let mut done_at: Vec<Duration> = done_at.into_iter().flatten().collect();
            done_at.sort();
            return Ok(RolloutSamples {
                fewest_ready,
                samples,
                done_at,
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
