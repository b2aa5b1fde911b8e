//! The container runtime behind a trait, in the spirit of youki's `Syscall`: the supervisor
//! talks to [`Runtime`], libcontainer is the real implementation, and [`super::fake::FakeRuntime`]
//! lets the orchestration be tested without root.
//!
//! Processes are handled through pidfds: once a container's init has been proven to be ours (it
//! is our unreaped child, or its boot id, start time and cgroup match what we recorded), every
//! signal goes through the pidfd, so a pid that the kernel reuses later can never be hit.

use std::time::Duration;

use anyhow::{anyhow, Result};

use super::dirs::RuntimeDirs;
use super::lifecycle::{self, StartRequest};
use super::process::{boot_id, in_cgroup, start_ticks, ProcHandle, ProcIdentity};

/// A container just started.
#[derive(Debug)]
pub struct Started {
    pub proc: ProcHandle,
    pub identity: ProcIdentity,
}

/// What the supervisor needs from a container runtime. Methods block: call them off the async
/// runtime's threads.
pub trait Runtime: Send + Sync + 'static {
    /// Create the rootfs and bundle, then create and start the container.
    fn start(&self, req: &StartRequest<'_>) -> Result<Started>;
    /// Re-attach to a container found after a daemon restart, only if its init is provably the
    /// process we started (same boot, same start time, in the container's cgroup).
    fn adopt(&self, id: &str, identity: &ProcIdentity) -> Result<ProcHandle, String>;
    /// Send a signal to the container's init (through its pidfd).
    fn signal(&self, id: &str, proc: &ProcHandle, sig: i32);
    /// Block until the process exits; its exit code when it was our child.
    fn wait(&self, proc: &ProcHandle) -> Option<i32>;
    /// SIGKILL every process in the container's cgroups.
    fn kill_all(&self, id: &str);
    /// OOM kills recorded for the container (read before destroying it).
    fn oom_kills(&self, id: &str) -> u64;
    /// Remove everything of a container: its processes (found by cgroup, never by a bare pid),
    /// state, cgroups, mounts and bundle. Idempotent.
    fn destroy(&self, id: &str) -> Result<()>;
    /// Ids of every container this runtime holds anything of.
    fn list(&self) -> Vec<String>;
    /// The container's cgroup v2 directory, where its PSI is read (none without a v2 tree).
    fn v2_cgroup(&self, _id: &str) -> Option<std::path::PathBuf> {
        None
    }
    /// Where pressure protection throttles the container (nothing in test doubles).
    fn controls(&self, _id: &str) -> crate::pressure::protect::Controls {
        crate::pressure::protect::Controls::default()
    }
    /// Run a command inside the container; killed at the timeout. Returns its exit code.
    fn exec(&self, id: &str, command: &[String], timeout: Duration) -> Result<i32>;
    /// HTTP GET from inside the process's network namespace; true on 2xx/3xx.
    fn http_get(
        &self,
        proc: &ProcHandle,
        host: &str,
        port: u16,
        path: &str,
        timeout: Duration,
    ) -> bool;
}

/// libcontainer in process.
pub struct LibcontainerRuntime {
    pub dirs: RuntimeDirs,
    pub policy: super::policy::NodePolicy,
}

impl LibcontainerRuntime {
    fn cgroup_path(&self, id: &str) -> String {
        format!("{}/{id}", self.dirs.cgroup_parent.trim_end_matches('/'))
    }
}

impl Runtime for LibcontainerRuntime {
    fn start(&self, req: &StartRequest<'_>) -> Result<Started> {
        let t0 = std::time::Instant::now();
        let _span = tracing::info_span!("container.start", container = req.id, workload = %req.workload.metadata.name, replica = req.replica).entered();
        let started = lifecycle::create_and_start(&self.dirs, &self.policy, req);
        let counters = &crate::telemetry::COUNTERS;
        counters.starts.record(started.is_ok());
        let pid = started?;
        counters.start_seconds.observe(t0.elapsed());
        if let Some(t) = crate::telemetry::get() {
            let dir = lifecycle::v2_cgroup_dir(&self.dirs, req.id);
            if let Some(cgid) = dir.as_deref().and_then(crate::pressure::psi::cgroup_id) {
                t.container_started(
                    req.id,
                    crate::telemetry::ReplicaKey {
                        namespace: req.workload.metadata.namespace().to_string(),
                        workload: req.workload.metadata.name.clone(),
                        replica: req.replica,
                    },
                    cgid,
                );
            }
        }
        // The init is our child and not yet reaped, so the pid is still it.
        let proc = match ProcHandle::open(pid, true) {
            Ok(p) => p,
            Err(e) => {
                let _ = self.destroy(req.id);
                return Err(anyhow!("pidfd of container {} init {pid}: {e}", req.id));
            }
        };
        let identity = ProcIdentity {
            pid,
            boot_id: boot_id(),
            start_ticks: start_ticks(pid).unwrap_or(0),
        };
        Ok(Started { proc, identity })
    }

    fn adopt(&self, id: &str, identity: &ProcIdentity) -> Result<ProcHandle, String> {
        let current_boot = boot_id();
        if identity.boot_id != current_boot {
            return Err(format!(
                "recorded under boot {}, this is boot {current_boot}",
                identity.boot_id
            ));
        }
        // Open first, then check: if the checks pass, the pidfd names the checked process.
        let proc = ProcHandle::open(identity.pid, false)
            .map_err(|e| format!("pid {} is gone: {e}", identity.pid))?;
        match start_ticks(identity.pid) {
            Some(t) if t == identity.start_ticks => {}
            Some(t) => {
                return Err(format!(
                "pid {} started at tick {t}, the container's init at tick {}: the pid was reused",
                identity.pid, identity.start_ticks
            ))
            }
            None => return Err(format!("pid {} is gone", identity.pid)),
        }
        if !in_cgroup(identity.pid, &self.cgroup_path(id)) {
            return Err(format!(
                "pid {} is not in cgroup {}",
                identity.pid,
                self.cgroup_path(id)
            ));
        }
        if proc.wait_gone(Some(Duration::ZERO)) {
            return Err(format!("pid {} exited during the check", identity.pid));
        }
        // An exec probe interrupted by the daemon's death leaves libcontainer's helper waiting
        // in the container's cgroup for a message that never comes: remove it.
        lifecycle::kill_stray_helpers(&self.dirs, id, identity.pid);
        Ok(proc)
    }

    fn signal(&self, id: &str, proc: &ProcHandle, sig: i32) {
        if let Err(e) = proc.signal(sig) {
            tracing::warn!(container = id, pid = proc.pid, sig, error = %e, "signal failed");
        }
    }

    fn wait(&self, proc: &ProcHandle) -> Option<i32> {
        proc.wait_gone(None);
        if proc.own_child {
            return lifecycle::wait_exit(proc.pid).ok();
        }
        // Not our child after a restart: the exit code belongs to its new parent.
        None
    }

    fn kill_all(&self, id: &str) {
        lifecycle::kill_cgroup(&self.dirs, id);
    }

    fn oom_kills(&self, id: &str) -> u64 {
        lifecycle::oom_kills(&self.dirs, id)
    }

    fn destroy(&self, id: &str) -> Result<()> {
        if let Some(t) = crate::telemetry::get() {
            // Once its processes are gone and before its cgroup is: its last readings.
            lifecycle::kill_cgroup(&self.dirs, id);
            let cpu = lifecycle::v2_cgroup_dir(&self.dirs, id)
                .and_then(|d| crate::telemetry::cpu_usec(&d));
            t.container_removed(id, cpu);
        }
        lifecycle::destroy(&self.dirs, id)
    }

    fn list(&self) -> Vec<String> {
        lifecycle::list_ids(&self.dirs)
    }

    fn v2_cgroup(&self, id: &str) -> Option<std::path::PathBuf> {
        lifecycle::v2_cgroup_dir(&self.dirs, id)
    }

    fn controls(&self, id: &str) -> crate::pressure::protect::Controls {
        lifecycle::controls(&self.dirs, id)
    }

    fn exec(&self, id: &str, command: &[String], timeout: Duration) -> Result<i32> {
        lifecycle::exec_in(&self.dirs, id, command, timeout)
    }

    fn http_get(
        &self,
        proc: &ProcHandle,
        host: &str,
        port: u16,
        path: &str,
        timeout: Duration,
    ) -> bool {
        let Some(fd) = proc.pidfd() else {
            return false;
        };
        super::netns::http_get_in_netns(fd, host, port, path, timeout)
    }
}
