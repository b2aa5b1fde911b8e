//! The OCI runtime spec of one replica: its process (command, environment, user looked up
//! inside the image), mounts, namespaces, cgroup limits, capabilities and seccomp profile,
//! built with `oci-spec`'s types under the node's policy.

use std::fs;
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use hyperbox_api::{NetworkMode, Workload};

use super::dirs::RuntimeDirs;
use super::policy::NodePolicy;
use crate::images::PreparedImage;
use libcontainer::oci_spec::runtime::{
    Capabilities, Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder,
    LinuxDeviceCgroupBuilder, LinuxMemoryBuilder, LinuxNamespaceBuilder, LinuxNamespaceType,
    LinuxPidsBuilder, LinuxResourcesBuilder, Mount, MountBuilder, PosixRlimitBuilder,
    PosixRlimitType, ProcessBuilder, RootBuilder, Spec, SpecBuilder, UserBuilder,
};

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
    set(format!(
        "HOSTNAME={}",
        hyperbox_api::key::hostname(&w.metadata.name)
    ));
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
            let p = dirs
                .volumes
                .join(hyperbox_api::key::file_stem(&w.key()))
                .join(&vol.name);
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
        let bytes = m
            .value()
            .map_err(|e| anyhow!("spec.resources.memory: {e}"))?;
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
        let millis = c.value().map_err(|e| anyhow!("spec.resources.cpu: {e}"))?;
        resources = resources.cpu(
            LinuxCpuBuilder::default()
                .quota(quota_of_millis(millis))
                .period(CPU_PERIOD_US)
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
        .seccomp(super::seccomp::default_profile())
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
        .hostname(hyperbox_api::key::hostname(&w.metadata.name))
        .mounts(mounts)
        .linux(linux)
        .build()
        .map_err(spec_err)
}

/// The cfs period of every container (100 ms, the kernel's default).
pub const CPU_PERIOD_US: u64 = 100_000;

fn quota_of_millis(millis: u64) -> i64 {
    (millis * CPU_PERIOD_US / 1000).max(1000) as i64
}

/// The cfs quota a workload's cpu limit asks for (-1: none): what lifting a pressure throttle
/// restores.
pub fn cpu_quota_us(s: &hyperbox_api::WorkloadSpec) -> i64 {
    s.resources
        .cpu
        .as_ref()
        .and_then(|c| c.value().ok())
        .map(quota_of_millis)
        .unwrap_or(-1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::containers::RuntimeDirs;
    use crate::images::ImageConfig;

    fn workload(yaml: &str) -> Workload {
        serde_norway::from_str(yaml).unwrap()
    }

    fn image(entrypoint: &[&str], cmd: &[&str]) -> PreparedImage {
        PreparedImage {
            digest: "sha256:x".into(),
            lowers: vec![PathBuf::from("/nonexistent")],
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
