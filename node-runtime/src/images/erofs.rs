//! EROFS images: detection, building with mkfs.erofs, and read-only mounts (file-backed where the
//! kernel supports it, otherwise through a loop device set up in-process).

use std::fs::{self, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use nix::mount::{mount, MsFlags};

/// Whether this node can use EROFS, and if not, why.
#[derive(Debug, Clone)]
pub struct ErofsSupport {
    pub mkfs: Option<PathBuf>,
    pub reason: Option<String>,
}

impl ErofsSupport {
    pub fn enabled(&self) -> bool {
        self.mkfs.is_some()
    }

    /// Checks the kernel (`/proc/filesystems`, loading the module if needed) and the tool.
    pub fn detect() -> ErofsSupport {
        let disabled = |reason: String| ErofsSupport {
            mkfs: None,
            reason: Some(reason),
        };
        if std::env::var_os("HYPERBOX_DISABLE_EROFS").is_some() {
            return disabled("disabled by HYPERBOX_DISABLE_EROFS".into());
        }
        let in_kernel = || {
            fs::read_to_string("/proc/filesystems")
                .map(|t| {
                    t.lines()
                        .any(|l| l.split_whitespace().last() == Some("erofs"))
                })
                .unwrap_or(false)
        };
        if !in_kernel() {
            // The module may just not be loaded yet.
            let _ = Command::new("modprobe").arg("erofs").status();
            if !in_kernel() {
                return disabled("the kernel has no erofs filesystem (/proc/filesystems)".into());
            }
        }
        let mkfs = [
            "/usr/bin/mkfs.erofs",
            "/usr/sbin/mkfs.erofs",
            "/sbin/mkfs.erofs",
        ]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists());
        match mkfs {
            Some(p) => ErofsSupport {
                mkfs: Some(p),
                reason: None,
            },
            None => disabled("mkfs.erofs not found (install erofs-utils)".into()),
        }
    }
}

/// Build an uncompressed EROFS image of `dir` at `image` (compression costs ten times the
/// unpack; see STACK.md). Writes to a temp name and renames, so a crash leaves no half image.
pub fn build_image(mkfs: &Path, dir: &Path, image: &Path) -> Result<()> {
    let started = Instant::now();
    let tmp = image.with_extension("erofs.tmp");
    let _ = fs::remove_file(&tmp);
    let out = Command::new(mkfs)
        .arg("--quiet")
        .arg("--preserve-mtime")
        .arg(&tmp)
        .arg(dir)
        .output()
        .with_context(|| format!("run {}", mkfs.display()))?;
    if !out.status.success() {
        let _ = fs::remove_file(&tmp);
        bail!(
            "mkfs.erofs {} failed ({}): {}",
            image.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    fs::rename(&tmp, image).with_context(|| format!("rename {}", image.display()))?;
    tracing::debug!(image = %image.display(), elapsed_ms = started.elapsed().as_millis() as u64, "built erofs image");
    Ok(())
}

/// Mount an EROFS image read-only at `target`.
pub fn mount_image(image: &Path, target: &Path) -> Result<()> {
    fs::create_dir_all(target).with_context(|| format!("create {}", target.display()))?;
    let flags = MsFlags::MS_RDONLY | MsFlags::MS_NODEV | MsFlags::MS_NOSUID;
    // Kernels >= 6.12 mount EROFS straight from a file; older ones need a block device.
    match mount(Some(image), target, Some("erofs"), flags, None::<&str>) {
        Ok(()) => return Ok(()),
        Err(e) => {
            tracing::debug!(error = %e, "file-backed erofs mount refused, using a loop device")
        }
    }
    let loopdev = attach_loop(image)?;
    mount(Some(&loopdev), target, Some("erofs"), flags, None::<&str>).with_context(|| {
        format!(
            "mount erofs {} (via {}) on {}",
            image.display(),
            loopdev.display(),
            target.display()
        )
    })
}

const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;

#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// Attach `image` read-only to a free loop device with autoclear (the device detaches itself
/// when the filesystem on it is unmounted, so an unmount never leaks a loop device).
fn attach_loop(image: &Path) -> Result<PathBuf> {
    let backing = fs::File::open(image).with_context(|| format!("open {}", image.display()))?;
    let ctl = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")
        .context("open /dev/loop-control")?;
    for _ in 0..16 {
        // SAFETY: ioctl on a valid fd with an integer argument.
        let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE as _) };
        if n < 0 {
            bail!(
                "get a free loop device: {}",
                std::io::Error::last_os_error()
            );
        }
        let dev = PathBuf::from(format!("/dev/loop{n}"));
        let devf = OpenOptions::new()
            .read(true)
            .open(&dev)
            .with_context(|| format!("open {}", dev.display()))?;
        // SAFETY: LoopConfig is plain data; all-zero is a valid starting value.
        let mut cfg: LoopConfig = unsafe { std::mem::zeroed() };
        cfg.fd = backing.as_raw_fd() as u32;
        cfg.info.lo_flags = LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR;
        let name = image.as_os_str().as_encoded_bytes();
        let len = name.len().min(63);
        cfg.info.lo_file_name[..len].copy_from_slice(&name[..len]);
        // SAFETY: passes a pointer to a properly laid out loop_config.
        let rc = unsafe { libc::ioctl(devf.as_raw_fd(), LOOP_CONFIGURE as _, &cfg) };
        if rc == 0 {
            tracing::debug!(device = %dev.display(), image = %image.display(), "attached loop device");
            return Ok(dev);
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EBUSY) {
            continue; // somebody else took it between GET_FREE and CONFIGURE
        }
        bail!("configure {} for {}: {err}", dev.display(), image.display());
    }
    bail!("no free loop device for {}", image.display())
}

/// Overlay rootfs: the image's read-only lowers (top first), a per-container writable upper.
///
/// With one lower, or when the option string fits, a classic mount(2). Many layers do not fit
/// the one page mount(2) takes for options (120 layers of 100-byte paths): those go through
/// the new mount API, one `lowerdir+` per layer (Linux 6.8+). `HYPERBOX_LEGACY_OVERLAY_MOUNT=1`
/// forces the classic mount (to test the path older kernels take).
pub fn mount_overlay(lowers: &[PathBuf], upper: &Path, work: &Path, target: &Path) -> Result<()> {
    for d in [upper, work, target] {
        fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
    }
    if lowers.is_empty() {
        bail!("mount overlay on {}: no lower layer", target.display());
    }
    let lowerdir = lowers
        .iter()
        .map(|l| l.display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    let opts = format!(
        "lowerdir={lowerdir},upperdir={},workdir={}",
        upper.display(),
        work.display()
    );
    let legacy = std::env::var_os("HYPERBOX_LEGACY_OVERLAY_MOUNT").is_some();
    // mount(2) copies at most one page of options.
    if legacy || opts.len() < 4000 {
        if opts.len() >= 4096 {
            bail!(
                "mount overlay on {}: {} layers need {} bytes of mount options, more than the page mount(2) takes; this kernel needs the new mount API (lowerdir+, Linux 6.8+)",
                target.display(),
                lowers.len(),
                opts.len()
            );
        }
        return mount(
            Some("overlay"),
            target,
            Some("overlay"),
            MsFlags::empty(),
            Some(opts.as_str()),
        )
        .with_context(|| format!("mount overlay on {} ({opts})", target.display()));
    }
    mount_overlay_fsconfig(lowers, upper, work, target).with_context(|| {
        format!(
            "mount overlay of {} layers on {} (new mount API)",
            lowers.len(),
            target.display()
        )
    })
}

/// `fsopen("overlay")`, one `lowerdir+` per layer, then `fsmount` and `move_mount`.
fn mount_overlay_fsconfig(
    lowers: &[PathBuf],
    upper: &Path,
    work: &Path,
    target: &Path,
) -> Result<()> {
    use std::ffi::CString;
    use std::os::fd::{FromRawFd, OwnedFd};
    const FSOPEN_CLOEXEC: libc::c_uint = 1;
    const FSCONFIG_SET_STRING: libc::c_uint = 1;
    const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
    const FSMOUNT_CLOEXEC: libc::c_uint = 1;
    let cstr = |s: &str| CString::new(s).context("nul in a mount option");
    let path_cstr =
        |p: &Path| CString::new(p.as_os_str().as_encoded_bytes()).context("nul in a path");
    let fstype = cstr("overlay")?;
    // SAFETY: fsopen with a valid C string; the result is checked.
    let fs_fd = unsafe { libc::syscall(libc::SYS_fsopen, fstype.as_ptr(), FSOPEN_CLOEXEC) };
    if fs_fd < 0 {
        bail!("fsopen overlay: {}", std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor fsopen just returned, owned from here on.
    let fs_fd = unsafe { OwnedFd::from_raw_fd(fs_fd as i32) };
    let set = |key: &str, value: &CString| -> Result<()> {
        let k = cstr(key)?;
        // SAFETY: fsconfig on a valid fs context with valid C strings.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                fs_fd.as_raw_fd(),
                FSCONFIG_SET_STRING,
                k.as_ptr(),
                value.as_ptr(),
                0,
            )
        };
        if rc < 0 {
            bail!(
                "fsconfig {key}={value:?}: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    };
    for l in lowers {
        set("lowerdir+", &path_cstr(l)?)?;
    }
    set("upperdir", &path_cstr(upper)?)?;
    set("workdir", &path_cstr(work)?)?;
    // SAFETY: fsconfig command on a valid fs context.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs_fd.as_raw_fd(),
            FSCONFIG_CMD_CREATE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_void>(),
            0,
        )
    };
    if rc < 0 {
        bail!("create the overlay: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fsmount on a created fs context.
    let mnt = unsafe { libc::syscall(libc::SYS_fsmount, fs_fd.as_raw_fd(), FSMOUNT_CLOEXEC, 0) };
    if mnt < 0 {
        bail!("fsmount: {}", std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor fsmount just returned.
    let mnt = unsafe { OwnedFd::from_raw_fd(mnt as i32) };
    let empty = cstr("")?;
    let to = path_cstr(target)?;
    // SAFETY: move_mount of a detached mount onto a path, valid C strings.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            mnt.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if rc < 0 {
        bail!(
            "move_mount to {}: {}",
            target.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}
