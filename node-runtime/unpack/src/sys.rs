//! Thin `*at()` syscall wrappers and the directory-fd based tree operations
//! (walk, recursive removal, pruning) built on them.
//!
//! Nothing here ever resolves a path string containing `/`: every operation
//! takes a directory file descriptor and a single component name, and every
//! open of an intermediate directory uses `O_NOFOLLOW | O_DIRECTORY`, so a
//! symlink anywhere in the tree can never redirect an operation elsewhere.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use crate::path::child_of;

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

pub(crate) fn errno_is(err: &io::Error, code: libc::c_int) -> bool {
    err.raw_os_error() == Some(code)
}

pub(crate) fn is_dir_mode(mode: libc::mode_t) -> bool {
    mode & libc::S_IFMT == libc::S_IFDIR
}

pub(crate) fn is_symlink_mode(mode: libc::mode_t) -> bool {
    mode & libc::S_IFMT == libc::S_IFLNK
}

/// Opens `name` inside `dir` as a directory, refusing symlinks (`ELOOP`)
/// and non-directories (`ENOTDIR`).
pub(crate) fn open_dir_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<OwnedFd> {
    let fd = cvt(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: openat returned a fresh descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Creates a new regular file `name` in `dir`. `O_EXCL` makes this fail on
/// anything already there, including a (dangling) symlink.
pub(crate) fn create_file_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<File> {
    let fd = cvt(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0o600 as libc::c_uint,
        )
    })?;
    // SAFETY: openat returned a fresh descriptor that we now own.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// `fstatat(AT_SYMLINK_NOFOLLOW)`; `Ok(None)` when the name does not exist.
pub(crate) fn lstat_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Option<libc::stat>> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    let ret = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if ret < 0 {
        let err = io::Error::last_os_error();
        if errno_is(&err, libc::ENOENT) {
            return Ok(None);
        }
        return Err(err);
    }
    // SAFETY: fstatat succeeded and filled the buffer.
    Ok(Some(unsafe { st.assume_init() }))
}

pub(crate) fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: fstat succeeded and filled the buffer.
    Ok(unsafe { st.assume_init() })
}

pub(crate) fn mkdir_at(dir: BorrowedFd<'_>, name: &CStr, mode: libc::mode_t) -> io::Result<()> {
    cvt(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode) }).map(drop)
}

pub(crate) fn unlink_at(dir: BorrowedFd<'_>, name: &CStr, flags: libc::c_int) -> io::Result<()> {
    cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) }).map(drop)
}

pub(crate) fn symlink_at(target: &CStr, dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    cvt(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) }).map(drop)
}

/// `linkat` without `AT_SYMLINK_FOLLOW`: links the inode named by
/// `old_name` itself, never what a symlink points to.
pub(crate) fn link_at(
    old_dir: BorrowedFd<'_>,
    old_name: &CStr,
    new_dir: BorrowedFd<'_>,
    new_name: &CStr,
) -> io::Result<()> {
    cvt(unsafe {
        libc::linkat(
            old_dir.as_raw_fd(),
            old_name.as_ptr(),
            new_dir.as_raw_fd(),
            new_name.as_ptr(),
            0,
        )
    })
    .map(drop)
}

pub(crate) fn mknod_at(
    dir: BorrowedFd<'_>,
    name: &CStr,
    mode: libc::mode_t,
    dev: libc::dev_t,
) -> io::Result<()> {
    cvt(unsafe { libc::mknodat(dir.as_raw_fd(), name.as_ptr(), mode, dev) }).map(drop)
}

pub(crate) fn fchown(fd: BorrowedFd<'_>, uid: u32, gid: u32) -> io::Result<()> {
    cvt(unsafe { libc::fchown(fd.as_raw_fd(), uid, gid) }).map(drop)
}

/// `fchownat(AT_SYMLINK_NOFOLLOW)`: changes a symlink itself, not its target.
pub(crate) fn lchown_at(dir: BorrowedFd<'_>, name: &CStr, uid: u32, gid: u32) -> io::Result<()> {
    cvt(unsafe {
        libc::fchownat(
            dir.as_raw_fd(),
            name.as_ptr(),
            uid,
            gid,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

pub(crate) fn fchmod(fd: BorrowedFd<'_>, mode: libc::mode_t) -> io::Result<()> {
    cvt(unsafe { libc::fchmod(fd.as_raw_fd(), mode) }).map(drop)
}

/// `fchmodat` on a node this crate has just created with `mknodat` (so it
/// is known not to be a symlink; Linux cannot chmod symlinks anyway).
pub(crate) fn chmod_at(dir: BorrowedFd<'_>, name: &CStr, mode: libc::mode_t) -> io::Result<()> {
    cvt(unsafe { libc::fchmodat(dir.as_raw_fd(), name.as_ptr(), mode, 0) }).map(drop)
}

/// Access and modification time both set to `(seconds, nanoseconds)`.
pub(crate) fn timespecs(mtime: (i64, u32)) -> [libc::timespec; 2] {
    let ts = libc::timespec {
        tv_sec: mtime.0 as libc::time_t,
        tv_nsec: mtime.1 as libc::c_long,
    };
    [ts, ts]
}

pub(crate) fn futimens(fd: BorrowedFd<'_>, mtime: (i64, u32)) -> io::Result<()> {
    let times = timespecs(mtime);
    cvt(unsafe { libc::futimens(fd.as_raw_fd(), times.as_ptr()) }).map(drop)
}

/// `utimensat(AT_SYMLINK_NOFOLLOW)`.
pub(crate) fn lutimens_at(dir: BorrowedFd<'_>, name: &CStr, mtime: (i64, u32)) -> io::Result<()> {
    let times = timespecs(mtime);
    cvt(unsafe {
        libc::utimensat(
            dir.as_raw_fd(),
            name.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

pub(crate) fn fsetxattr(fd: BorrowedFd<'_>, name: &CStr, value: &[u8]) -> io::Result<()> {
    cvt(unsafe {
        libc::fsetxattr(
            fd.as_raw_fd(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    })
    .map(drop)
}

/// Names of the entries of a directory (without `.` and `..`).
pub(crate) fn list_dir(dir: BorrowedFd<'_>) -> io::Result<Vec<CString>> {
    // fdopendir takes ownership of the descriptor, so give it a duplicate.
    let fd = cvt(unsafe { libc::fcntl(dir.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) })?;
    let dirp = unsafe { libc::fdopendir(fd) };
    if dirp.is_null() {
        let err = io::Error::last_os_error();
        unsafe { libc::close(fd) };
        return Err(err);
    }
    // The duplicate shares the file offset; start from the beginning.
    unsafe { libc::rewinddir(dirp) };
    let mut names = Vec::new();
    let result = loop {
        // SAFETY: errno is thread-local; resetting it distinguishes the end
        // of the stream from an error, as readdir(3) prescribes.
        unsafe { *libc::__errno_location() = 0 };
        let ent = unsafe { libc::readdir(dirp) };
        if ent.is_null() {
            let err = io::Error::last_os_error();
            break if errno_is(&err, 0) { Ok(()) } else { Err(err) };
        }
        // SAFETY: d_name is a NUL-terminated string inside the entry, valid
        // until the next readdir call; it is copied right away.
        let name = unsafe { CStr::from_ptr((*ent).d_name.as_ptr()) };
        if matches!(name.to_bytes(), b"." | b"..") {
            continue;
        }
        names.push(name.to_owned());
    };
    unsafe { libc::closedir(dirp) };
    result.map(|()| names)
}

/// Best-effort: when not privileged, give ourselves rwx on a directory we
/// are about to empty, so read-only directories can be removed.
fn make_owner_accessible(fd: BorrowedFd<'_>) {
    if let Ok(st) = fstat(fd) {
        if st.st_mode & 0o700 != 0o700 {
            let _ = fchmod(fd, (st.st_mode & 0o7777) | 0o700);
        }
    }
}

/// Why walking to a directory failed.
#[derive(Debug)]
pub(crate) enum WalkError {
    /// Component `n` (0-based) is a symlink.
    Symlink(usize),
    /// Component `n` exists and is not a directory.
    NotDir(usize),
    /// A component does not exist (only when not creating).
    Missing,
    /// Another error, with the operation that failed.
    Io(&'static str, io::Error),
}

/// Walks from `root` through `comps`, opening every component with
/// `O_NOFOLLOW | O_DIRECTORY`, and returns a descriptor of the last one
/// (a duplicate of `root` when `comps` is empty). With `create`, missing
/// components are created with mode 0755.
pub(crate) fn walk(
    root: BorrowedFd<'_>,
    comps: &[CString],
    create: bool,
) -> Result<OwnedFd, WalkError> {
    let mut cur = root
        .try_clone_to_owned()
        .map_err(|e| WalkError::Io("duplicate root descriptor", e))?;
    for (i, comp) in comps.iter().enumerate() {
        let next = match open_dir_at(cur.as_fd(), comp) {
            Ok(fd) => fd,
            Err(err) if errno_is(&err, libc::ENOENT) && create => {
                let made = match mkdir_at(cur.as_fd(), comp, 0o755) {
                    Ok(()) => true,
                    Err(e) if errno_is(&e, libc::EEXIST) => false,
                    Err(e) => return Err(WalkError::Io("create parent directory", e)),
                };
                let fd = open_dir_at(cur.as_fd(), comp)
                    .map_err(|e| classify(cur.as_fd(), comp, i, e))?;
                if made {
                    // Exactly 0755, whatever the process umask is.
                    fchmod(fd.as_fd(), 0o755)
                        .map_err(|e| WalkError::Io("chmod parent directory", e))?;
                }
                fd
            }
            Err(err) => return Err(classify(cur.as_fd(), comp, i, err)),
        };
        cur = next;
    }
    Ok(cur)
}

fn classify(dir: BorrowedFd<'_>, comp: &CStr, index: usize, err: io::Error) -> WalkError {
    if errno_is(&err, libc::ENOENT) {
        return WalkError::Missing;
    }
    if errno_is(&err, libc::ELOOP) || errno_is(&err, libc::ENOTDIR) {
        return match lstat_at(dir, comp) {
            Ok(Some(st)) if is_symlink_mode(st.st_mode) => WalkError::Symlink(index),
            Ok(Some(_)) => WalkError::NotDir(index),
            Ok(None) => WalkError::Missing,
            Err(e) => WalkError::Io("stat parent directory", e),
        };
    }
    WalkError::Io("open parent directory", err)
}

/// Removes `name` in `dir` whatever it is; a directory is removed with all
/// its contents (iteratively, never following symlinks). A missing name is
/// not an error.
pub(crate) fn remove_all_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    match unlink_at(dir, name, 0) {
        Ok(()) => return Ok(()),
        Err(e) if errno_is(&e, libc::ENOENT) => return Ok(()),
        Err(e) if errno_is(&e, libc::EISDIR) || errno_is(&e, libc::EPERM) => {}
        Err(e) => return Err(e),
    }

    struct Frame {
        fd: OwnedFd,
        name: CString,
        children: Vec<CString>,
    }
    fn open_frame(parent: BorrowedFd<'_>, name: &CStr) -> io::Result<Frame> {
        let fd = open_dir_at(parent, name)?;
        make_owner_accessible(fd.as_fd());
        let children = list_dir(fd.as_fd())?;
        Ok(Frame {
            fd,
            name: name.to_owned(),
            children,
        })
    }

    let mut stack = vec![open_frame(dir, name)?];
    loop {
        let Some(top) = stack.last_mut() else {
            return Ok(());
        };
        match top.children.pop() {
            Some(child) => match unlink_at(top.fd.as_fd(), &child, 0) {
                Ok(()) => {}
                Err(e) if errno_is(&e, libc::ENOENT) => {}
                Err(e) if errno_is(&e, libc::EISDIR) || errno_is(&e, libc::EPERM) => {
                    let frame = open_frame(top.fd.as_fd(), &child)?;
                    stack.push(frame);
                }
                Err(e) => return Err(e),
            },
            None => {
                let done = stack.pop().expect("stack is not empty");
                let parent = stack.last().map_or(dir, |f| f.fd.as_fd());
                match unlink_at(parent, &done.name, libc::AT_REMOVEDIR) {
                    Ok(()) => {}
                    Err(e) if errno_is(&e, libc::ENOENT) => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }
}

/// Removes everything below the directory `dir` (whose joined path is
/// `dir_path`) except what `keep` selects. A kept directory is descended
/// into and pruned the same way; a kept non-directory is left alone.
pub(crate) fn prune_dir(
    dir: OwnedFd,
    dir_path: Vec<u8>,
    keep: &dyn Fn(&[u8]) -> bool,
) -> io::Result<()> {
    struct Frame {
        fd: OwnedFd,
        path: Vec<u8>,
        children: Vec<CString>,
    }
    let children = list_dir(dir.as_fd())?;
    let mut stack = vec![Frame {
        fd: dir,
        path: dir_path,
        children,
    }];
    loop {
        let Some(top) = stack.last_mut() else {
            return Ok(());
        };
        let Some(child) = top.children.pop() else {
            stack.pop();
            continue;
        };
        let child_path = child_of(&top.path, child.to_bytes());
        if !keep(&child_path) {
            remove_all_at(top.fd.as_fd(), &child)?;
            continue;
        }
        match lstat_at(top.fd.as_fd(), &child)? {
            Some(st) if is_dir_mode(st.st_mode) => {
                let fd = open_dir_at(top.fd.as_fd(), &child)?;
                let children = list_dir(fd.as_fd())?;
                stack.push(Frame {
                    fd,
                    path: child_path,
                    children,
                });
            }
            _ => {}
        }
    }
}

/// Opens `path` as the target root directory (following symlinks: the
/// caller chose it).
pub(crate) fn open_root(path: &std::path::Path) -> io::Result<OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(path)?;
    Ok(OwnedFd::from(file))
}
