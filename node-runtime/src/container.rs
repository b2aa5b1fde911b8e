//! Containers: the OCI runtime spec for a replica, the overlay rootfs, and the libcontainer
//! (youki) calls that create, signal and delete them, in process.

use std::fs;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use hyperbox_api::quantity::{parse_cpu_millis, parse_memory_bytes};
use hyperbox_api::{NetworkMode, Workload};
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::oci_spec::runtime::{
    Capabilities, Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder,
    LinuxDeviceCgroupBuilder, LinuxMemoryBuilder, LinuxNamespaceBuilder, LinuxNamespaceType,
    LinuxPidsBuilder, LinuxResourcesBuilder, Mount, MountBuilder, PosixRlimitBuilder,
    PosixRlimitType, ProcessBuilder, RootBuilder, Spec, SpecBuilder, UserBuilder,
};
use libcontainer::syscall::syscall::SyscallType;
use libcontainer::workload::default::DefaultExecutor;

use crate::erofs::mount_overlay;
use crate::fsutil::{remove_dir_all_if_exists, unmount_if_mounted};
use crate::image::PreparedImage;
use crate::policy::NodePolicy;

/// libcontainer changes the *process* working directory while it creates a container (to bind
/// and connect its notify socket by a short relative path) and changes it back afterwards. In a
/// multi-threaded daemon two creations at once would race on the cwd, so every libcontainer
/// create/start/exec runs under this lock (and the daemon itself works from `/`).
static LIBCONTAINER_CWD: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Where the runtime keeps container state.
#[derive(Debug, Clone)]
pub struct RuntimeDirs {
    /// `<state>/containers/<id>`: bundle (config.json), rootfs, upper, work.
    pub containers: PathBuf,
    /// libcontainer's own state root: per boot, under the run dir (tmpfs), so that nothing
    /// from before a reboot (a pid above all) is ever taken for current.
    pub libcontainer_root: PathBuf,
    /// Where an older version kept libcontainer state (in the persistent state dir); only
    /// cleaned up.
    pub legacy_libcontainer_root: Option<PathBuf>,
    /// `<state>/volumes/<workload>/<volume>` for emptyDir volumes.
    pub volumes: PathBuf,
    /// cgroup parent, e.g. `/hyperbox`.
    pub cgroup_parent: String,
}

impl RuntimeDirs {
    pub fn bundle(&self, id: &str) -> PathBuf {
        self.containers.join(id)
    }
}

/// Capabilities granted by default: the short list container engines use, without
/// `CAP_NET_RAW` (raw sockets) unless the node's policy allows it.
fn default_caps(net_raw: bool) -> Capabilities {
    let mut caps: Capabilities = [
        Capability::Chown,
        Capability::DacOverride,
        Capability::Fsetid,
        Capability::Fowner,
        Capability::Mknod,
        Capability::Setgid,
        Capability::Setuid,
        Capability::Setfcap,
        Capability::Setpcap,
        Capability::NetBindService,
        Capability::SysChroot,
        Capability::Kill,
        Capability::AuditWrite,
    ]
    .into_iter()
    .collect();
    if net_raw {
        caps.insert(Capability::NetRaw);
    }
    caps
}

/// The process a container runs, resolved from the workload and the image config.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessSpec {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
}

pub fn resolve_process(w: &Workload, image: &PreparedImage, rootfs: &Path) -> Result<ProcessSpec> {
    let s = &w.spec;
    let ic = &image.config;
    // Kubernetes semantics: command replaces ENTRYPOINT (and drops CMD), args replace CMD.
    let mut args = if s.command.is_empty() {
        ic.entrypoint.clone()
    } else {
        s.command.clone()
    };
    if !s.args.is_empty() {
        args.extend(s.args.iter().cloned());
    } else if s.command.is_empty() {
        args.extend(ic.cmd.iter().cloned());
    }
    if args.is_empty() {
        bail!("spec.command: the image has no entrypoint or cmd, so command is required");
    }
    let mut env: Vec<String> = Vec::new();
    let mut set = |kv: String| {
        let key = kv.split('=').next().unwrap_or("").to_string();
        env.retain(|e| e.split('=').next() != Some(key.as_str()));
        env.push(kv);
    };
    set("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    for e in &ic.env {
        set(e.clone());
    }
    set(format!("HOSTNAME={}", w.metadata.name));
    for e in &s.env {
        set(format!("{}={}", e.name, e.value));
    }
    let cwd = s
        .working_dir
        .clone()
        .or_else(|| Some(ic.working_dir.clone()).filter(|d| !d.is_empty()))
        .unwrap_or_else(|| "/".into());
    let user = s.user.clone().unwrap_or_else(|| ic.user.clone());
    let (uid, gid) = resolve_user(&user, rootfs)?;
    Ok(ProcessSpec {
        args,
        env,
        cwd,
        uid,
        gid,
    })
}

/// Largest /etc/passwd or /etc/group read from an image.
const MAX_ACCOUNT_FILE_BYTES: u64 = 1 << 20;

/// Read a file of the image by its path inside the rootfs. Symlinks resolve inside the rootfs
/// (`openat2` with `RESOLVE_IN_ROOT`), only regular files are read, and at most
/// [`MAX_ACCOUNT_FILE_BYTES`]: a hostile image cannot point us at a host file, `/dev/zero` or
/// a FIFO. A missing file is `Ok(None)`.
pub fn read_in_root(rootfs: &Path, rel: &str) -> Result<Option<String>> {
    use std::io::Read;
    use std::os::unix::ffi::OsStrExt;
    let root = fs::File::open(rootfs).with_context(|| format!("open {}", rootfs.display()))?;
    let c_rel = std::ffi::CString::new(std::ffi::OsStr::new(rel).as_bytes())
        .map_err(|_| anyhow!("{rel}: path has a NUL byte"))?;
    // SAFETY: open_how is plain data; zeroed is a valid value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NONBLOCK | libc::O_NOCTTY) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: openat2 with a valid dirfd, C string and open_how of the size we pass.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            std::os::fd::AsRawFd::as_raw_fd(&root),
            c_rel.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    } as i32;
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::NotFound {
            return Ok(None);
        }
        return Err(e).with_context(|| format!("image file /{rel}"));
    }
    // SAFETY: a fresh fd we own.
    let f = unsafe { fs::File::from_raw_fd(fd) };
    let meta = f.metadata().with_context(|| format!("image file /{rel}"))?;
    if !meta.is_file() {
        bail!("image file /{rel} is not a regular file");
    }
    if meta.len() > MAX_ACCOUNT_FILE_BYTES {
        bail!(
            "image file /{rel} is {} bytes, more than the {MAX_ACCOUNT_FILE_BYTES} allowed",
            meta.len()
        );
    }
    let mut text = String::new();
    f.take(MAX_ACCOUNT_FILE_BYTES)
        .read_to_string(&mut text)
        .with_context(|| format!("read image file /{rel}"))?;
    Ok(Some(text))
}

/// `uid[:gid]` or `name[:group]`, names looked up in the image's /etc/passwd and /etc/group.
fn resolve_user(user: &str, rootfs: &Path) -> Result<(u32, u32)> {
    if user.is_empty() {
        return Ok((0, 0));
    }
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let passwd = read_in_root(rootfs, "etc/passwd")
        .context("spec.user")?
        .unwrap_or_default();
    let (uid, primary_gid) = match u.parse::<u32>() {
        Ok(n) => (
            n,
            passwd
                .lines()
                .map(|l| l.split(':').collect::<Vec<_>>())
                .find(|f| f.len() > 3 && f[2] == u)
                .and_then(|f| f[3].parse().ok())
                .unwrap_or(n),
        ),
        Err(_) => passwd
            .lines()
            .map(|l| l.split(':').collect::<Vec<_>>())
            .find(|f| f.len() > 3 && f[0] == u)
            .and_then(|f| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
            .ok_or_else(|| anyhow!("spec.user: no user {u:?} in the image's /etc/passwd"))?,
    };
    let gid = match g {
        None => primary_gid,
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => read_in_root(rootfs, "etc/group")
                .context("spec.user")?
                .unwrap_or_default()
                .lines()
                .map(|l| l.split(':').collect::<Vec<_>>())
                .find(|f| f.len() > 2 && f[0] == g)
                .and_then(|f| f[2].parse().ok())
                .ok_or_else(|| anyhow!("spec.user: no group {g:?} in the image's /etc/group"))?,
        },
    };
    Ok((uid, gid))
}

fn mount(destination: &str, typ: &str, source: impl Into<PathBuf>, options: &[&str]) -> Mount {
    MountBuilder::default()
        .destination(destination)
        .typ(typ)
        .source(source.into())
        .options(options.iter().map(|o| o.to_string()).collect::<Vec<_>>())
        .build()
        .expect("mount")
}

fn spec_err(e: libcontainer::oci_spec::OciSpecError) -> anyhow::Error {
    anyhow!("build the runtime spec: {e}")
}

/// The OCI runtime spec (config.json) of one replica.
pub fn oci_spec(
    w: &Workload,
    process: &ProcessSpec,
    dirs: &RuntimeDirs,
    policy: &NodePolicy,
    id: &str,
) -> Result<Spec> {
    let s = &w.spec;
    let mut mounts = vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"]),
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        ),
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
            ],
        ),
        mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        ),
        mount(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        ),
        mount(
            "/sys",
            "sysfs",
            "sysfs",
            &["nosuid", "noexec", "nodev", "ro"],
        ),
    ];
    if s.network == NetworkMode::Host {
        // Name resolution of the node, as with a host-network pod.
        for f in ["/etc/resolv.conf", "/etc/hosts"] {
            if Path::new(f).exists() {
                mounts.push(mount(f, "bind", f, &["rbind", "ro", "nosuid", "nodev"]));
            }
        }
    }
    for m in &s.mounts {
        let (index, vol) = s
            .volumes
            .iter()
            .enumerate()
            .find(|(_, v)| v.name == m.name)
            .ok_or_else(|| anyhow!("spec.mounts: no volume named {:?}", m.name))?;
        let source = if let Some(h) = &vol.host_path {
            // Checked again with symlinks resolved: admission saw only the path as written.
            let real = fs::canonicalize(&h.path).map_err(|e| {
                anyhow!(
                    "spec.volumes[{index}].hostPath.path: {} on this node: {e}",
                    h.path
                )
            })?;
            if !policy.host_path_allowed(&real) {
                bail!(
                    "spec.volumes[{index}].hostPath.path: {} resolves to {}, outside the host paths this node allows ({})",
                    h.path,
                    real.display(),
                    policy.allowed_list()
                );
            }
            real
        } else {
            let p = dirs.volumes.join(&w.metadata.name).join(&vol.name);
            fs::create_dir_all(&p).with_context(|| format!("create {}", p.display()))?;
            p
        };
        let mut options = vec!["rbind", "nosuid", "nodev"];
        if m.read_only {
            options.push("ro");
        }
        mounts.push(mount(&m.mount_path, "bind", source, &options));
    }
    let mut namespaces = vec![
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Mount,
    ];
    if s.network == NetworkMode::None {
        namespaces.push(LinuxNamespaceType::Network);
    }
    let namespaces = namespaces
        .into_iter()
        .map(|t| LinuxNamespaceBuilder::default().typ(t).build())
        .collect::<Result<Vec<_>, _>>()
        .map_err(spec_err)?;
    let mut resources =
        LinuxResourcesBuilder::default().devices(vec![LinuxDeviceCgroupBuilder::default()
            .allow(false)
            .access("rwm")
            .build()
            .map_err(spec_err)?]);
    if let Some(m) = &s.resources.memory {
        let bytes = parse_memory_bytes(m).map_err(|e| anyhow!("spec.resources.memory: {e}"))?;
        // swap == limit: no swap use beyond the memory limit.
        resources = resources.memory(
            LinuxMemoryBuilder::default()
                .limit(bytes as i64)
                .swap(bytes as i64)
                .build()
                .map_err(spec_err)?,
        );
    }
    if let Some(c) = &s.resources.cpu {
        let millis = parse_cpu_millis(c).map_err(|e| anyhow!("spec.resources.cpu: {e}"))?;
        let period: u64 = 100_000;
        resources = resources.cpu(
            LinuxCpuBuilder::default()
                .quota((millis * period / 1000).max(1000) as i64)
                .period(period)
                .build()
                .map_err(spec_err)?,
        );
    }
    if let Some(p) = s.resources.pids {
        resources = resources.pids(
            LinuxPidsBuilder::default()
                .limit(p)
                .build()
                .map_err(spec_err)?,
        );
    }
    let caps = default_caps(policy.allow_net_raw);
    // As many open files as this daemon may have (raising beyond it needs more than root has).
    let nofile = {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit fills the struct we pass.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
            lim.rlim_max.min(1 << 20)
        } else {
            1024
        }
    };
    let to_paths = |v: &[&str]| v.iter().map(|p| p.to_string()).collect::<Vec<_>>();
    let process_spec = ProcessBuilder::default()
        .terminal(false)
        .user(
            UserBuilder::default()
                .uid(process.uid)
                .gid(process.gid)
                .build()
                .map_err(spec_err)?,
        )
        .args(process.args.clone())
        .env(process.env.clone())
        .cwd(&process.cwd)
        .capabilities(
            LinuxCapabilitiesBuilder::default()
                .bounding(caps.clone())
                .effective(caps.clone())
                .permitted(caps)
                .build()
                .map_err(spec_err)?,
        )
        .rlimits(vec![PosixRlimitBuilder::default()
            .typ(PosixRlimitType::RlimitNofile)
            .hard(nofile)
            .soft(nofile)
            .build()
            .map_err(spec_err)?])
        .no_new_privileges(true)
        .build()
        .map_err(spec_err)?;
    let linux = LinuxBuilder::default()
        .cgroups_path(PathBuf::from(format!("{}/{id}", dirs.cgroup_parent)))
        .namespaces(namespaces)
        .resources(resources.build().map_err(spec_err)?)
        .seccomp(crate::seccomp::default_profile())
        .masked_paths(to_paths(&[
            "/proc/acpi",
            "/proc/asound",
            "/proc/kcore",
            "/proc/keys",
            "/proc/latency_stats",
            "/proc/timer_list",
            "/proc/timer_stats",
            "/proc/sched_debug",
            "/proc/scsi",
            "/sys/firmware",
            "/sys/devices/virtual/powercap",
        ]))
        .readonly_paths(to_paths(&[
            "/proc/bus",
            "/proc/fs",
            "/proc/irq",
            "/proc/sys",
            "/proc/sysrq-trigger",
        ]))
        .build()
        .map_err(spec_err)?;
    SpecBuilder::default()
        .version("1.0.2")
        .process(process_spec)
        .root(
            RootBuilder::default()
                .path("rootfs")
                .readonly(false)
                .build()
                .map_err(spec_err)?,
        )
        .hostname(w.metadata.name.clone())
        .mounts(mounts)
        .linux(linux)
        .build()
        .map_err(spec_err)
}

/// Everything needed to start one replica's container.
pub struct StartRequest<'a> {
    pub id: &'a str,
    pub workload: &'a Workload,
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
        &req.image.lower,
        &bundle.join("upper"),
        &bundle.join("work"),
        &rootfs,
    )?;
    let result = (|| {
        let process = resolve_process(req.workload, req.image, &rootfs)?;
        let spec = oci_spec(req.workload, &process, dirs, policy, req.id)?;
        fs::write(bundle.join("config.json"), serde_json::to_vec(&spec)?)
            .context("write config.json")?;
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(req.log_file)
            .with_context(|| format!("open log {}", req.log_file.display()))?;
        let log_err: OwnedFd = log.try_clone().context("dup log fd")?.into();
        let devnull: OwnedFd = fs::File::open("/dev/null")
            .context("open /dev/null")?
            .into();
        let prepared = t0.elapsed();
        let _cwd = LIBCONTAINER_CWD.lock().unwrap_or_else(|e| e.into_inner());
        let mut container = ContainerBuilder::new(req.id.to_string(), SyscallType::default())
            .with_executor(DefaultExecutor {})
            .with_root_path(&dirs.libcontainer_root)
            .map_err(|e| anyhow!("libcontainer root: {e}"))?
            .with_stdin(devnull)
            .with_stdout(OwnedFd::from(log))
            .with_stderr(log_err)
            .validate_id()
            .map_err(|e| anyhow!("container id {}: {e}", req.id))?
            .as_init(&bundle)
            .with_systemd(false)
            .with_detach(true)
            .build()
            .map_err(|e| anyhow!("create container {}: {e}", req.id))?;
        if req.workload.spec.network == NetworkMode::None {
            let pid = container
                .pid()
                .ok_or_else(|| anyhow!("container {} has no pid after create", req.id))?;
            bring_up_loopback(pid.as_raw())?;
        }
        let built = t0.elapsed();
        container
            .start()
            .map_err(|e| anyhow!("start container {}: {e}", req.id))?;
        tracing::debug!(
            container = req.id,
            rootfs_and_spec_us = prepared.as_micros() as u64,
            create_us = (built - prepared).as_micros() as u64,
            start_us = (t0.elapsed() - built).as_micros() as u64,
            "container created and started"
        );
        container
            .pid()
            .map(|p| p.as_raw())
            .ok_or_else(|| anyhow!("container {} has no pid after start", req.id))
    })();
    if result.is_err() {
        let _ = destroy(dirs, req.id);
    }
    result
}

#[repr(C)]
struct IfReqFlags {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// A fresh network namespace has its loopback down; services inside expect 127.0.0.1 to work
/// (runc brings it up too). Done from a short-lived thread: setns only moves that thread.
fn bring_up_loopback(pid: i32) -> Result<()> {
    use std::os::fd::{AsFd, AsRawFd};
    const SIOCGIFFLAGS: libc::c_ulong = 0x8913;
    const SIOCSIFFLAGS: libc::c_ulong = 0x8914;
    // The init is our unreaped child here, so the pid is still it.
    let ns = fs::File::open(format!("/proc/{pid}/ns/net"))
        .with_context(|| format!("open network namespace of pid {pid}"))?;
    crate::fsutil::in_network_namespace(ns.as_fd(), || {
        // SAFETY: socket() has no memory arguments; the fd is wrapped right away.
        let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if sock < 0 {
            bail!("socket: {}", std::io::Error::last_os_error());
        }
        // SAFETY: sock is a fresh fd we own.
        let sock = unsafe { OwnedFd::from_raw_fd(sock) };
        let mut req = IfReqFlags {
            name: [0; 16],
            flags: 0,
            _pad: [0; 22],
        };
        req.name[..2].copy_from_slice(b"lo");
        // SAFETY: ioctl with a properly sized ifreq.
        if unsafe { libc::ioctl(sock.as_raw_fd(), SIOCGIFFLAGS as _, &mut req) } != 0 {
            bail!("get flags of lo: {}", std::io::Error::last_os_error());
        }
        req.flags |= libc::IFF_UP as libc::c_short;
        // SAFETY: as above.
        if unsafe { libc::ioctl(sock.as_raw_fd(), SIOCSIFFLAGS as _, &req) } != 0 {
            bail!("bring up lo: {}", std::io::Error::last_os_error());
        }
        Ok(())
    })
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
    let devnull = || -> Result<OwnedFd> {
        Ok(fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")?
            .into())
    };
    let cwd = LIBCONTAINER_CWD.lock().unwrap_or_else(|e| e.into_inner());
    let pid = ContainerBuilder::new(id.to_string(), SyscallType::default())
        .with_executor(DefaultExecutor {})
        .with_root_path(&dirs.libcontainer_root)
        .map_err(|e| anyhow!("libcontainer root: {e}"))?
        .with_stdin(devnull()?)
        .with_stdout(devnull()?)
        .with_stderr(devnull()?)
        .as_tenant()
        .with_container_args(command.to_vec())
        .with_detach(true)
        .build()
        .map_err(|e| anyhow!("exec in {id}: {e}"))?;
    drop(cwd);
    let pid = pid.as_raw();
    // Our unreaped child: the pid is still it.
    let proc = crate::runtime::ProcHandle::open_child(pid)
        .map_err(|e| anyhow!("exec in {id}: pidfd of {pid}: {e}"))?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::ImageConfig;

    fn workload(yaml: &str) -> Workload {
        serde_norway::from_str(yaml).unwrap()
    }

    fn image(entrypoint: &[&str], cmd: &[&str]) -> PreparedImage {
        PreparedImage {
            digest: "sha256:x".into(),
            lower: PathBuf::from("/nonexistent"),
            config: ImageConfig {
                entrypoint: entrypoint.iter().map(|s| s.to_string()).collect(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                env: vec!["PATH=/img/bin".into(), "A=image".into()],
                working_dir: "/srv".into(),
                user: String::new(),
            },
            rootfs_kind: "erofs".into(),
        }
    }

    const W: &str = "apiVersion: hyperbox.dev/v1alpha1\nkind: Workload\nmetadata: {name: t}\nspec:\n  image: x\n";

    #[test]
    fn command_and_args_follow_kubernetes_rules() {
        let root = tempfile::tempdir().unwrap();
        let p = resolve_process(&workload(W), &image(&["/ep"], &["c1"]), root.path()).unwrap();
        assert_eq!(p.args, vec!["/ep", "c1"]);
        let w = workload(&format!("{W}  args: [a]\n"));
        assert_eq!(
            resolve_process(&w, &image(&["/ep"], &["c1"]), root.path())
                .unwrap()
                .args,
            vec!["/ep", "a"]
        );
        let w = workload(&format!("{W}  command: [/bin/x]\n"));
        assert_eq!(
            resolve_process(&w, &image(&["/ep"], &["c1"]), root.path())
                .unwrap()
                .args,
            vec!["/bin/x"]
        );
        assert!(resolve_process(&workload(W), &image(&[], &[]), root.path()).is_err());
    }

    #[test]
    fn env_overrides_and_user_lookup() {
        let root = tempfile::tempdir().unwrap();
        fs::create_dir_all(root.path().join("etc")).unwrap();
        fs::write(
            root.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n",
        )
        .unwrap();
        fs::write(root.path().join("etc/group"), "wheel:x:10:\n").unwrap();
        let w = workload(&format!(
            "{W}  user: app\n  env: [{{name: A, value: spec}}]\n"
        ));
        let p = resolve_process(&w, &image(&["/ep"], &[]), root.path()).unwrap();
        assert_eq!((p.uid, p.gid), (1000, 1001));
        assert!(p.env.contains(&"A=spec".to_string()) && !p.env.contains(&"A=image".to_string()));
        assert!(p.env.contains(&"PATH=/img/bin".to_string()));
        assert_eq!(p.cwd, "/srv");
        assert_eq!(resolve_user("app:wheel", root.path()).unwrap(), (1000, 10));
        assert_eq!(resolve_user("42", root.path()).unwrap(), (42, 42));
        assert!(resolve_user("nobody", root.path())
            .unwrap_err()
            .to_string()
            .contains("spec.user"));
    }

    #[test]
    fn spec_carries_limits_and_isolation() {
        let root = tempfile::tempdir().unwrap();
        let dirs = RuntimeDirs {
            containers: root.path().join("c"),
            libcontainer_root: root.path().join("l"),
            legacy_libcontainer_root: None,
            volumes: root.path().join("v"),
            cgroup_parent: "/hyperbox".into(),
        };
        let w = workload(&format!("{W}  network: none\n  resources: {{memory: 64Mi, cpu: 500m, pids: 20}}\n  volumes: [{{name: d, emptyDir: {{}}}}]\n  mounts: [{{name: d, mountPath: /data, readOnly: true}}]\n"));
        let p = resolve_process(&w, &image(&["/ep"], &[]), root.path()).unwrap();
        let policy = NodePolicy {
            host_path_allow: vec![],
            allow_net_raw: false,
        };
        let s = serde_json::to_value(oci_spec(&w, &p, &dirs, &policy, "t-0-abc").unwrap()).unwrap();
        let caps = s["process"]["capabilities"]["bounding"].as_array().unwrap();
        assert!(!caps.iter().any(|c| c == "CAP_NET_RAW"), "{caps:?}");
        assert!(caps.iter().any(|c| c == "CAP_CHOWN"));
        assert_eq!(s["linux"]["seccomp"]["defaultAction"], "SCMP_ACT_ERRNO");
        assert_eq!(s["linux"]["resources"]["memory"]["limit"], 64 << 20);
        assert_eq!(s["linux"]["resources"]["cpu"]["quota"], 50_000);
        assert_eq!(s["linux"]["resources"]["pids"]["limit"], 20);
        assert_eq!(s["linux"]["cgroupsPath"], "/hyperbox/t-0-abc");
        assert!(s["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["type"] == "network"));
        assert_eq!(s["process"]["noNewPrivileges"], true);
        let data = s["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["destination"] == "/data")
            .unwrap();
        assert!(data["options"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o == "ro"));
        assert!(root.path().join("v/t/d").is_dir());
    }
}
