//! One daemon per state dir: `serve` takes a lock on `<state>/lock` before it sweeps, unmounts
//! or unlinks anything, and a second daemon on the same dir exits with the holder's pid and
//! touches nothing.
//!
//! The lock is a POSIX record lock (`fcntl(F_SETLK)`), not `flock`: it belongs to the process,
//! so children forked by the daemon (the container spawner, containers that outlive a
//! `KillMode=process` restart) never hold it, and it goes when the daemon dies however it
//! dies, kill -9 included. `F_GETLK` names the holder. The pid is also written into the file
//! for people (a holder in another pid namespace shows as pid 0 to `F_GETLK`). Nothing else in
//! the daemon may open the lock file: closing any descriptor of it drops a POSIX lock.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Why the state dir could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "state dir {dir} is in use by another hyperbox-node (pid {pid}): stop it first, or give this one another --state-dir"
    )]
    Held { dir: PathBuf, pid: String },
    #[error("lock the state dir: {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl LockError {
    /// A stable word for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            LockError::Held { .. } => "StateDirInUse",
            LockError::Io { .. } => "StateDirLockFailed",
        }
    }
}

/// The held lock: dropped (or the process gone), the state dir is free again.
#[derive(Debug)]
pub struct StateLock {
    _file: File,
    pub path: PathBuf,
}

fn whole_file(kind: libc::c_short) -> libc::flock {
    // SAFETY: flock is plain data; all-zero is a valid value (SEEK_SET, start 0, len 0 = all).
    let mut l: libc::flock = unsafe { std::mem::zeroed() };
    l.l_type = kind;
    l.l_whence = libc::SEEK_SET as libc::c_short;
    l
}

/// Take the lock on `state_dir`, or say who holds it.
pub fn lock(state_dir: &Path) -> Result<StateLock, LockError> {
    let path = state_dir.join("lock");
    let io = |source| LockError::Io {
        path: path.clone(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io)?;
    let mut l = whole_file(libc::F_WRLCK as libc::c_short);
    // SAFETY: a valid fd and a pointer to a properly initialised flock.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLK, &l) } != 0 {
        let err = std::io::Error::last_os_error();
        if !matches!(err.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) {
            return Err(io(err));
        }
        // Who holds it: the kernel's answer, else what the holder wrote.
        // SAFETY: as above.
        let asked = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETLK, &mut l) } == 0;
        let pid = if asked && l.l_type != libc::F_UNLCK as libc::c_short && l.l_pid > 0 {
            l.l_pid.to_string()
        } else {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            match text.trim() {
                "" => "unknown".to_string(),
                t => t.chars().take(20).collect(),
            }
        };
        return Err(LockError::Held {
            dir: state_dir.to_path_buf(),
            pid,
        });
    }
    file.set_len(0).map_err(io)?;
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    writeln!(file, "{}", std::process::id()).map_err(io)?;
    tracing::debug!(path = %path.display(), "state dir locked");
    Ok(StateLock { _file: file, path })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid() {
        // POSIX locks are per process: a second lock from this process would succeed, so the
        // contender is a child process.
        let dir = tempfile::tempdir().unwrap();
        let held = lock(dir.path()).unwrap();
        // SAFETY: the child only tries the lock and _exits (glibc's malloc is fork-safe).
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let want = format!("(pid {})", nix::unistd::getppid());
                let code = match lock(dir.path()) {
                    Err(e @ LockError::Held { .. }) if e.to_string().contains(&want) => 0,
                    Err(LockError::Held { pid, .. }) => 10 + pid.len() as i32,
                    Err(LockError::Io { .. }) => 2,
                    Ok(_) => 3,
                };
                // SAFETY: leave the forked child without running the parent's destructors.
                unsafe { libc::_exit(code) };
            }
            nix::unistd::ForkResult::Parent { child } => {
                let status = nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(status, nix::sys::wait::WaitStatus::Exited(child, 0));
            }
        }
        // The pid is in the file for people. (Reading it closes a descriptor of the file,
        // which drops this process's POSIX lock: done last.)
        assert_eq!(
            std::fs::read_to_string(&held.path).unwrap().trim(),
            std::process::id().to_string()
        );
        // Released on drop: the dir can be locked again (the file stays).
        drop(held);
        let again = lock(dir.path()).unwrap();
        assert!(again.path.exists());
    }
}
