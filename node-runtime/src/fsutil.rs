//! Small helpers any folder may use: atomic writes, fsync, mount table queries, entering a
//! network namespace, and RFC 3339 time. They call nothing else in the node.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Write a file so that readers (and a daemon restarted after `kill -9`) see either the old
/// or the new content, never a torn write: temp file, fsync, rename, fsync the directory.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    write_atomic_with(path, data, true)
}

/// Like [`write_atomic`] but without the fsyncs: the rename is still atomic for readers, and
/// the caller makes the batch durable with one [`syncfs`].
pub fn write_atomic_nosync(path: &Path, data: &[u8]) -> Result<()> {
    write_atomic_with(path, data, false)
}

fn write_atomic_with(path: &Path, data: &[u8], durable: bool) -> Result<()> {
    hyperbox_api::util::write_atomic(path, data, durable)
        .with_context(|| format!("write {}", path.display()))
}

pub use hyperbox_api::util::{now_unix, now_unix_ms};

/// Run `f` on a short-lived thread that first joins the network namespace behind `ns_fd` (a
/// `/proc/PID/ns/net` file or a pidfd). setns(CLONE_NEWNET) moves only the calling thread,
/// and that thread ends with `f`, so no other code ever runs in the wrong namespace.
pub fn in_network_namespace<T: Send>(
    ns_fd: std::os::fd::BorrowedFd<'_>,
    f: impl FnOnce() -> Result<T> + Send,
) -> Result<T> {
    use std::os::fd::AsRawFd;
    let raw = ns_fd.as_raw_fd();
    std::thread::scope(|s| {
        s.spawn(move || {
            // SAFETY: setns on an fd the caller keeps open while we run; this thread only.
            if unsafe { libc::setns(raw, libc::CLONE_NEWNET) } != 0 {
                anyhow::bail!(
                    "enter network namespace: {}",
                    std::io::Error::last_os_error()
                );
            }
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("network namespace thread panicked"))?
    })
}

/// fsync one file or directory.
pub fn fsync_path(path: &Path) -> Result<()> {
    fs::File::open(path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("fsync {}", path.display()))
}

/// Flush the filesystem holding `path` (one call makes a batch of unsynced writes durable).
pub fn syncfs(path: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let f = fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    // SAFETY: syncfs on an fd we own.
    if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("syncfs {}", path.display()));
    }
    Ok(())
}

pub fn write_json_atomic<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let data = serde_json::to_vec_pretty(value).context("serialize state")?;
    write_atomic(path, &data)
}

pub fn write_json_atomic_nosync<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let data = serde_json::to_vec(value).context("serialize state")?;
    write_atomic_nosync(path, &data)
}

/// Mount points currently in this mount namespace (from /proc/self/mountinfo; procfs splits
/// the fields and leaves the kernel's octal escapes, undone here).
pub fn mount_points() -> Result<Vec<PathBuf>> {
    let info = procfs::process::Process::myself()
        .and_then(|p| p.mountinfo())
        .context("read /proc/self/mountinfo")?;
    Ok(info
        .into_iter()
        .map(|m| PathBuf::from(unescape_mount_path(&m.mount_point.to_string_lossy())))
        .collect())
}

/// mountinfo escapes space, tab, newline and backslash as octal (`\040`).
fn unescape_mount_path(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn is_mount_point(path: &Path) -> bool {
    mount_points()
        .map(|m| m.iter().any(|p| p == path))
        .unwrap_or(false)
}

/// Unmount (lazily when busy) if mounted; quiet when it is not a mount point.
pub fn unmount_if_mounted(path: &Path) -> Result<()> {
    if !is_mount_point(path) {
        return Ok(());
    }
    tracing::debug!(path = %path.display(), "umount");
    match nix::mount::umount2(path, nix::mount::MntFlags::empty()) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EBUSY) => {
            nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH)
                .with_context(|| format!("lazy unmount {}", path.display()))
        }
        Err(e) => Err(e).with_context(|| format!("unmount {}", path.display())),
    }
}

/// Remove a directory tree if it exists.
pub fn remove_dir_all_if_exists(path: &Path) -> Result<()> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("remove {}", path.display())),
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` of a unix time (UTC).
pub fn format_rfc3339(unix: u64) -> String {
    // Civil-from-days (Howard Hinnant's algorithm), UTC.
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        (secs % 3600) / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_content() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a/b.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::read_dir(p.parent().unwrap()).unwrap().count(), 1);
    }

    #[test]
    fn a_mount_point_with_a_space_in_its_path_is_found() {
        // mountinfo writes the space as \040: procfs decodes it. (Root, as CI is.)
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("a b");
        fs::create_dir(&target).unwrap();
        assert!(!is_mount_point(&target));
        nix::mount::mount(
            Some("tmpfs"),
            &target,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .expect("mount a tmpfs (the unit tests run as root)");
        let found = is_mount_point(&target);
        nix::mount::umount(&target).unwrap();
        assert!(found);
    }

    #[test]
    fn root_is_a_mount_point() {
        assert!(is_mount_point(Path::new("/")));
    }

    #[test]
    fn rfc3339() {
        assert_eq!(format_rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_rfc3339(1_795_000_000), "2026-11-18T11:06:40Z");
    }
}
