//! A container's init process: the pidfd handle through which every signal goes once the
//! process is proven to be ours, and the identity (boot, start time) that proves it after a
//! daemon restart.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Proof that a pid is the container's init: a pid alone is reused by the kernel, the pair
/// (boot, start time) is not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcIdentity {
    pub pid: i32,
    pub boot_id: String,
    /// Start time in clock ticks since boot (`/proc/PID/stat` field 22).
    pub start_ticks: u64,
}

/// A process we have proven to be a container's init.
#[derive(Debug)]
pub struct ProcHandle {
    pub pid: i32,
    /// Started by this daemon: its exit code is ours to collect.
    pub own_child: bool,
    pidfd: Option<OwnedFd>,
}

impl ProcHandle {
    /// A handle without a pidfd (test doubles).
    pub fn detached(pid: i32, own_child: bool) -> ProcHandle {
        ProcHandle {
            pid,
            own_child,
            pidfd: None,
        }
    }

    /// A handle on our own, not yet reaped, child.
    pub fn open_child(pid: i32) -> std::io::Result<ProcHandle> {
        ProcHandle::open(pid, true)
    }

    pub(super) fn open(pid: i32, own_child: bool) -> std::io::Result<ProcHandle> {
        // SAFETY: pidfd_open has no memory arguments.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(ProcHandle {
            pid,
            own_child,
            // SAFETY: a fresh fd we own.
            pidfd: Some(unsafe { OwnedFd::from_raw_fd(fd) }),
        })
    }

    /// Send a signal through the pidfd: it reaches this process or nothing.
    pub fn signal(&self, sig: i32) -> std::io::Result<()> {
        let Some(fd) = &self.pidfd else {
            return Ok(());
        };
        // SAFETY: pidfd_send_signal with a valid fd and no siginfo.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                fd.as_raw_fd(),
                sig,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            // Already exited: nothing to signal.
            if e.raw_os_error() == Some(libc::ESRCH) {
                return Ok(());
            }
            return Err(e);
        }
        Ok(())
    }

    /// Wait until the process exits, up to `timeout` (forever with `None`); true once gone.
    pub fn wait_gone(&self, timeout: Option<Duration>) -> bool {
        let Some(fd) = &self.pidfd else {
            return true;
        };
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        loop {
            let ms = match deadline {
                None => -1,
                Some(d) => {
                    let left = d.saturating_duration_since(std::time::Instant::now());
                    left.as_millis().min(i32::MAX as u128) as i32
                }
            };
            // SAFETY: one valid pollfd.
            let r = unsafe { libc::poll(&mut pfd, 1, ms) };
            if r > 0 {
                return true;
            }
            if r == 0 {
                return false;
            }
            if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                return true;
            }
        }
    }

    /// The pidfd, for setns into the process's namespaces.
    pub fn pidfd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        self.pidfd.as_ref().map(|f| f.as_fd())
    }
}

/// This boot's id (changes on every reboot).
pub fn boot_id() -> String {
    procfs::sys::kernel::random::boot_id().unwrap_or_default()
}

/// Start time of a process in clock ticks since boot (`starttime` of /proc/PID/stat).
pub fn start_ticks(pid: i32) -> Option<u64> {
    Some(
        procfs::process::Process::new(pid)
            .ok()?
            .stat()
            .ok()?
            .starttime,
    )
}

/// Whether `/proc/PID/cgroup` places the process in `<parent>/<id>` in some hierarchy.
pub fn in_cgroup(pid: i32, cgroup_path: &str) -> bool {
    let Ok(groups) = procfs::process::Process::new(pid).and_then(|p| p.cgroups()) else {
        return false;
    };
    let want = format!("/{}", cgroup_path.trim_start_matches('/'));
    groups
        .into_iter()
        .any(|g| g.pathname == want || g.pathname.starts_with(&format!("{want}/")))
}
