//! A container's life: the overlay rootfs, and the libcontainer (youki) calls that create,
//! signal and delete it, in process. The runtime spec itself is built in [`super::spec`].

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use hyperbox_api::{NetworkMode, Workload};

use super::dirs::RuntimeDirs;
use super::policy::NodePolicy;
use crate::fsutil::{remove_dir_all_if_exists, unmount_if_mounted};
use crate::images::erofs::mount_overlay;
use crate::images::PreparedImage;

use super::spawner;
use super::spec::{oci_spec, resolve_process};

/// Everything needed to start one replica's container.
pub struct StartRequest<'a> {
    pub id: &'a str,
    pub workload: &'a Workload,
    /// Which replica of the workload (what telemetry attributes the container to).
    pub replica: u32,
    pub image: &'a PreparedImage,
    pub log_file: &'a Path,
}

/// Create the overlay rootfs and the bundle, then create and start the container. Returns the
/// pid of the container's init (a child of this process). Blocking: call off the async runtime.
pub fn create_and_start(
    dirs: &RuntimeDirs,
    policy: &NodePolicy,
    req: &StartRequest,
) -> Result<i32> {
    let t0 = std::time::Instant::now();
    let bundle = dirs.bundle(req.id);
    let rootfs = bundle.join("rootfs");
    mount_overlay(
        &req.image.lowers,
        &bundle.join("upper"),
        &bundle.join("work"),
        &rootfs,
    )?;
    let result = (|| {
        let process = resolve_process(req.workload, req.image, &rootfs)?;
        let spec = oci_spec(req.workload, &process, dirs, policy, req.id)?;
        fs::write(bundle.join("config.json"), serde_json::to_vec(&spec)?)
            .context("write config.json")?;
        let prepared = t0.elapsed();
        // libcontainer's clones run in the single-threaded spawner (see `spawner`).
        let pid = spawner::request(&spawner::Request::Create {
            id: req.id.to_string(),
            root: dirs.libcontainer_root.clone(),
            bundle: bundle.clone(),
            log: req.log_file.to_path_buf(),
            loopback: req.workload.spec.network == NetworkMode::None,
            v2_cgroup: crate::pressure::psi::needs_v2_placement()
                .then(|| v2_cgroup_dir(dirs, req.id))
                .flatten(),
        })?;
        tracing::debug!(
            container = req.id,
            rootfs_and_spec_us = prepared.as_micros() as u64,
            create_and_start_us = (t0.elapsed() - prepared).as_micros() as u64,
            "container created and started"
        );
        Ok(pid)
    })();
    if result.is_err() {
        let _ = destroy(dirs, req.id);
    }
    result
}

/// Kill everything in the container's cgroups, delete its libcontainer state, cgroups, rootfs
/// mount and bundle. Idempotent: safe on half-created or already-gone containers.
///
/// Processes are found through the container's cgroups only, never through the pid in the
/// libcontainer state: after a reboot or a crash that pid may belong to someone else.
pub fn destroy(dirs: &RuntimeDirs, id: &str) -> Result<()> {
    kill_cgroup(dirs, id);
    remove_dir_all_if_exists(&dirs.libcontainer_root.join(id))?;
    if let Some(legacy) = &dirs.legacy_libcontainer_root {
        remove_dir_all_if_exists(&legacy.join(id))?;
    }
    remove_cgroups(dirs, id);
    let bundle = dirs.bundle(id);
    unmount_if_mounted(&bundle.join("rootfs"))?;
    remove_dir_all_if_exists(&bundle)?;
    Ok(())
}

/// Pids in any of the container's cgroups.
fn cgroup_pids(dirs: &RuntimeDirs, id: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    for d in cgroup_dirs(dirs, id) {
        if let Ok(t) = fs::read_to_string(d.join("cgroup.procs")) {
            pids.extend(t.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        }
    }
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// SIGKILL libcontainer helper processes (named `youki:[…]`, never exec'd) in the container's
/// cgroups, except the container's init: what an exec left behind when the daemon died.
pub fn kill_stray_helpers(dirs: &RuntimeDirs, id: &str, init: i32) {
    for pid in cgroup_pids(dirs, id) {
        if pid == init {
            continue;
        }
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.starts_with("youki:") {
            tracing::warn!(
                container = id,
                pid,
                comm = comm.trim(),
                "killing a runtime helper left in the container"
            );
            // SAFETY: kill has no memory arguments; the pid is in the container's cgroup.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// SIGKILL every process in the container's cgroups and wait (briefly) for them to go. A
/// process cannot leave its cgroup from inside a container, so membership is proof enough.
pub fn kill_cgroup(dirs: &RuntimeDirs, id: &str) {
    // cgroup v2 (pure v2 host, or where the container also sits in the unified tree).
    for d in cgroup_dirs(dirs, id) {
        let kill = d.join("cgroup.kill");
        if kill.exists() {
            let _ = fs::write(&kill, "1");
        }
    }
    for _ in 0..200 {
        let pids = cgroup_pids(dirs, id);
        if pids.is_empty() {
            return;
        }
        for pid in pids {
            // SAFETY: kill has no memory arguments.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    tracing::warn!(
        container = id,
        "processes left in the container's cgroups after SIGKILL"
    );
}

/// Ids of every container with a bundle, libcontainer state or cgroup here.
pub fn list_ids(dirs: &RuntimeDirs) -> Vec<String> {
    let mut ids = std::collections::BTreeSet::new();
    let mut roots = vec![&dirs.containers, &dirs.libcontainer_root];
    if let Some(l) = &dirs.legacy_libcontainer_root {
        roots.push(l);
    }
    for dir in roots {
        if let Ok(entries) = fs::read_dir(dir) {
            for e in entries.flatten() {
                ids.insert(e.file_name().to_string_lossy().to_string());
            }
        }
    }
    for parent in cgroup_parent_dirs(&dirs.cgroup_parent) {
        if let Ok(entries) = fs::read_dir(parent) {
            for e in entries.flatten() {
                if e.path().is_dir() {
                    ids.insert(e.file_name().to_string_lossy().to_string());
                }
            }
        }
    }
    ids.into_iter().collect()
}

/// The cgroup parent directory in every hierarchy where it exists: each v1 controller
/// (`/sys/fs/cgroup/<controller>/<parent>`, including a hybrid host's `unified`) and a pure
/// v2 host's root (`/sys/fs/cgroup/<parent>`).
pub fn cgroup_parent_dirs(parent: &str) -> Vec<PathBuf> {
    let rel = parent.trim_start_matches('/');
    if rel.is_empty() {
        return Vec::new();
    }
    let root = Path::new("/sys/fs/cgroup");
    let mut out: Vec<PathBuf> = fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join(rel))
        .filter(|p| p.is_dir())
        .collect();
    let v2 = root.join(rel);
    if v2.is_dir() && !out.contains(&v2) {
        out.push(v2);
    }
    out
}

/// The container's cgroup v2 directory (where its PSI is read): under the unified tree of a
/// hybrid host, or its own cgroup on a pure v2 host. `None` on a v1-only host.
pub fn v2_cgroup_dir(dirs: &RuntimeDirs, id: &str) -> Option<PathBuf> {
    let rel = dirs.cgroup_parent.trim_start_matches('/');
    Some(crate::pressure::psi::v2_root()?.join(rel).join(id))
}

/// Where pressure protection holds the container back: its v2 cgroup when that has the memory
/// controller (pure v2 hosts), else its v1 memory and cpu cgroups.
pub fn controls(dirs: &RuntimeDirs, id: &str) -> crate::pressure::protect::Controls {
    let rel = dirs.cgroup_parent.trim_start_matches('/');
    let root = Path::new("/sys/fs/cgroup");
    let existing = |p: PathBuf| p.is_dir().then_some(p);
    crate::pressure::protect::Controls {
        v2: v2_cgroup_dir(dirs, id).filter(|d| d.join("memory.current").exists()),
        v1_memory: existing(root.join("memory").join(rel).join(id))
            .filter(|d| d.join("memory.soft_limit_in_bytes").exists()),
        v1_cpu: existing(root.join("cpu").join(rel).join(id))
            .filter(|d| d.join("cpu.cfs_quota_us").exists()),
    }
}

/// cgroup directories a container may have (v1 controllers and the v2/unified hierarchy).
pub fn cgroup_dirs(dirs: &RuntimeDirs, id: &str) -> Vec<PathBuf> {
    cgroup_parent_dirs(&dirs.cgroup_parent)
        .into_iter()
        .map(|p| p.join(id))
        .filter(|p| p.exists())
        .collect()
}

fn remove_cgroups(dirs: &RuntimeDirs, id: &str) {
    for d in cgroup_dirs(dirs, id) {
        // Only empty cgroups can be removed; children first.
        if let Ok(entries) = fs::read_dir(&d) {
            for e in entries.flatten() {
                if e.path().is_dir() {
                    let _ = fs::remove_dir(e.path());
                }
            }
        }
        if let Err(e) = fs::remove_dir(&d) {
            tracing::debug!(cgroup = %d.display(), error = %e, "cgroup not removed");
        }
    }
}

/// Number of OOM kills recorded in the container's memory cgroup (v2 `memory.events` or v1
/// `memory.oom_control`). Read before the container is deleted.
pub fn oom_kills(dirs: &RuntimeDirs, id: &str) -> u64 {
    let rel = format!("{}/{id}", dirs.cgroup_parent.trim_start_matches('/'));
    let candidates = [
        (
            Path::new("/sys/fs/cgroup").join(&rel).join("memory.events"),
            "oom_kill",
        ),
        (
            Path::new("/sys/fs/cgroup/memory")
                .join(&rel)
                .join("memory.oom_control"),
            "oom_kill",
        ),
    ];
    for (path, key) in candidates {
        if let Ok(text) = fs::read_to_string(&path) {
            for line in text.lines() {
                let mut parts = line.split_whitespace();
                if parts.next() == Some(key) {
                    return parts.next().and_then(|v| v.parse().ok()).unwrap_or(0);
                }
            }
        }
    }
    0
}

/// Run a command inside a running container (exec readiness probe); returns its exit code.
/// At the timeout the command is killed and reaped, so a hung probe never leaks a process or
/// a thread. Blocking.
pub fn exec_in(
    dirs: &RuntimeDirs,
    id: &str,
    command: &[String],
    timeout: std::time::Duration,
) -> Result<i32> {
    let pid = spawner::request(&spawner::Request::Exec {
        id: id.to_string(),
        root: dirs.libcontainer_root.clone(),
        args: command.to_vec(),
    })
    .with_context(|| format!("exec in {id}"))?;
    // Our unreaped child (a sibling of the spawner): the pid is still it.
    let proc = match super::process::ProcHandle::open_child(pid) {
        Ok(p) => p,
        Err(e) => {
            let _ = wait_exit(pid);
            bail!("exec in {id}: pidfd of {pid}: {e}");
        }
    };
    if !proc.wait_gone(Some(timeout)) {
        let _ = proc.signal(libc::SIGKILL);
        let _ = wait_exit(pid);
        bail!(
            "exec in {id}: {:?} timed out after {:.1}s and was killed",
            command,
            timeout.as_secs_f64()
        );
    }
    wait_exit(pid)
}

/// Wait for a child (including CLONE_PARENT siblings, which exit without SIGCHLD: hence
/// __WALL) and turn its status into a shell-style exit code (128 + signal when killed).
pub fn wait_exit(pid: i32) -> Result<i32> {
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: plain waitpid on a pid we created.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::__WALL) };
        if r == pid {
            spawner::disown(pid);
            if libc::WIFEXITED(status) {
                return Ok(libc::WEXITSTATUS(status));
            }
            if libc::WIFSIGNALED(status) {
                return Ok(128 + libc::WTERMSIG(status));
            }
            continue;
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        return Err(anyhow!("wait for pid {pid}: {err}"));
    }
}
