//! `hyperbox-node serve`: wires the image store, the container runtime, the supervisor, the API
//! listeners, telemetry and cluster registration together.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::containers::policy::NodePolicy;
use crate::containers::LibcontainerRuntime;
use crate::containers::RuntimeDirs;
use crate::images::erofs::ErofsSupport;
use crate::images::{ImageStore, StoreConfig, UnpackLimits};
use crate::workloads::{Supervisor, SupervisorConfig};

#[derive(Clone)]
pub struct ServeOptions {
    pub state_dir: PathBuf,
    /// Per-boot runtime state (tmpfs): libcontainer state, so nothing outlives a reboot.
    pub run_dir: PathBuf,
    pub socket: PathBuf,
    pub listen: Option<String>,
    pub token_file: Option<PathBuf>,
    /// TLS for the TCP listener.
    pub tls: Option<crate::api::ServerTls>,
    pub metrics_listen: Option<String>,
    pub insecure_registries: Vec<String>,
    pub auth_file: Option<PathBuf>,
    pub registry_ca: Vec<PathBuf>,
    pub supervisor: SupervisorConfig,
    pub max_unpacked_bytes: u64,
    pub allow_devices: bool,
    /// Images as stacks of shared layers (`--image-store layers`).
    pub layered: bool,
    pub cgroup_parent: String,
    /// Directories hostPath volumes may use, besides HyperBox's own volumes dir.
    pub allow_host_paths: Vec<PathBuf>,
    pub allow_net_raw: bool,
    /// `--label`s, on top of the well-known ones.
    pub labels: Vec<(String, String)>,
    /// Held back from the capacity for the system and HyperBox itself (`--reserve`).
    pub reserve: hyperbox_api::ResourceAmounts,
    /// New replicas are refused while this PSI signal is above its threshold.
    pub pressure_gate: Option<crate::pressure::admission::PressureGate>,
    /// Pressure protection (`--pressure-protection`), none when off.
    pub protection: Option<crate::pressure::protect::ProtectConfig>,
    /// The node's name in telemetry (`--node-name`, else the host name).
    pub node_name: String,
    /// Load the eBPF telemetry programs (`--ebpf`).
    pub ebpf: crate::telemetry::EbpfMode,
    /// Push metrics over OTLP to this endpoint at this interval (`--otlp-endpoint`).
    pub otlp: Option<(String, Duration)>,
    /// Register and heartbeat a HyperNode (`--kubeconfig`).
    pub kubernetes: Option<(crate::cluster::ApiServer, crate::cluster::Registration)>,
}

/// The soft limit on open files up to the hard one (as Go programs do at start): the default
/// soft limit of 1,024 is for programs that use `select`, and the daemon holds a pidfd, a log
/// and a record per container besides its connections. Containers get their own limit in
/// their spec.
fn raise_nofile_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and fill the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 || lim.rlim_cur >= lim.rlim_max {
            return;
        }
        let from = lim.rlim_cur;
        lim.rlim_cur = lim.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
            tracing::debug!(from, to = lim.rlim_max, "raised the open files limit");
        }
    }
}

pub async fn serve(opts: ServeOptions) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("hyperbox-node serve must run as root (it creates namespaces, cgroups and mounts)");
    }
    raise_nofile_limit();
    let state = &opts.state_dir;
    // Work from `/`: the container spawner inherits this cwd, libcontainer returns to it after
    // each container start, and it must never be a directory that gets deleted.
    let state_abs =
        std::path::absolute(state).with_context(|| format!("resolve {}", state.display()))?;
    let socket_abs = std::path::absolute(&opts.socket)
        .with_context(|| format!("resolve {}", opts.socket.display()))?;
    let abs = |p: &Option<PathBuf>| p.as_ref().and_then(|p| std::path::absolute(p).ok());
    let run_abs = std::path::absolute(&opts.run_dir)
        .with_context(|| format!("resolve {}", opts.run_dir.display()))?;
    let allow_host_paths = opts
        .allow_host_paths
        .iter()
        .map(std::path::absolute)
        .collect::<std::io::Result<Vec<_>>>()
        .context("resolve --allow-host-path")?;
    let opts = ServeOptions {
        state_dir: state_abs,
        run_dir: run_abs,
        allow_host_paths,
        socket: socket_abs,
        token_file: abs(&opts.token_file),
        tls: opts.tls.as_ref().map(|t| crate::api::ServerTls {
            cert: std::path::absolute(&t.cert).unwrap_or_else(|_| t.cert.clone()),
            key: std::path::absolute(&t.key).unwrap_or_else(|_| t.key.clone()),
            client_ca: t
                .client_ca
                .as_ref()
                .map(|c| std::path::absolute(c).unwrap_or_else(|_| c.clone())),
        }),
        auth_file: abs(&opts.auth_file),
        registry_ca: opts
            .registry_ca
            .iter()
            .filter_map(|p| std::path::absolute(p).ok())
            .collect(),
        ..opts
    };
    std::env::set_current_dir("/").context("chdir /")?;
    let state = &opts.state_dir;
    std::fs::create_dir_all(state)
        .with_context(|| format!("create state dir {}", state.display()))?;
    let state = state
        .canonicalize()
        .with_context(|| format!("resolve {}", state.display()))?;
    // Before any sweep, unmount or unlink: a second daemon on this dir stops here.
    let _state_lock = crate::state_lock::lock(&state)?;
    let erofs = ErofsSupport::detect();
    match &erofs.reason {
        None => tracing::info!("erofs enabled: images are mounted as read-only erofs"),
        Some(r) => {
            tracing::warn!(reason = %r, "erofs unavailable: falling back to plain directories as the image layer")
        }
    }
    let images = Arc::new(ImageStore::open(
        StoreConfig {
            root: state.join("images"),
            insecure_registries: opts.insecure_registries.clone(),
            auth_file: opts.auth_file.clone(),
            unpack: UnpackLimits {
                max_bytes: opts.max_unpacked_bytes,
                allow_devices: opts.allow_devices,
            },
            max_concurrent_downloads: 3,
            registry_ca: opts.registry_ca.clone(),
            layered: opts.layered,
        },
        erofs,
    )?);
    std::fs::create_dir_all(&opts.run_dir)
        .with_context(|| format!("create run dir {}", opts.run_dir.display()))?;
    // Before any container starts or is adopted: the eBPF programs attach to the cgroup
    // parent and count from then on.
    let t0 = std::time::Instant::now();
    let telemetry = crate::telemetry::init(opts.ebpf, &opts.cgroup_parent, opts.node_name.clone());
    tracing::debug!(
        ebpf = telemetry.ebpf.active,
        ms = t0.elapsed().as_millis() as u64,
        "telemetry ready"
    );
    let legacy = state.join("libcontainer");
    let dirs = RuntimeDirs {
        containers: state.join("containers"),
        libcontainer_root: opts.run_dir.join("libcontainer"),
        legacy_libcontainer_root: legacy.exists().then(|| legacy.clone()),
        volumes: state.join("volumes"),
        cgroup_parent: opts.cgroup_parent.clone(),
    };
    for d in [&dirs.containers, &dirs.libcontainer_root] {
        std::fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
    }
    let mut host_path_allow = vec![dirs.volumes.clone()];
    for p in &opts.allow_host_paths {
        // Admission compares the path as written, the runtime compares it with symlinks
        // resolved: keep both spellings of each allowed directory.
        let real = std::fs::canonicalize(p)
            .with_context(|| format!("--allow-host-path {}", p.display()))?;
        host_path_allow.push(p.clone());
        host_path_allow.push(real);
    }
    host_path_allow.dedup();
    let policy = NodePolicy {
        host_path_allow,
        allow_net_raw: opts.allow_net_raw,
    };
    tracing::info!(host_paths = %policy.allowed_list(), net_raw = policy.allow_net_raw, "node policy");
    let runtime = Arc::new(LibcontainerRuntime {
        dirs: dirs.clone(),
        policy: policy.clone(),
    });
    let sup = Supervisor::new(
        &state,
        dirs.volumes.clone(),
        runtime,
        images.clone(),
        Some(images),
        opts.supervisor.clone(),
    )?;
    sup.set_policy(policy);
    let capacity = crate::pressure::host::capacity();
    let facts = crate::pressure::admission::NodeFacts {
        id: crate::pressure::host::load_or_create_id(&state)?,
        labels: crate::pressure::admission::node_labels(
            &crate::pressure::host::hostname(),
            &opts.labels,
        ),
        capacity,
        allocatable: capacity.minus(opts.reserve),
        pressure_gate: opts.pressure_gate,
        pressure_dir: crate::pressure::psi::v2_root()
            .map(|r| r.join(opts.cgroup_parent.trim_start_matches('/'))),
    };
    tracing::info!(
        node_id = %facts.id,
        labels = ?facts.labels,
        allocatable_cpu_millis = facts.allocatable.cpu_millis,
        allocatable_memory = %crate::pressure::admission::bytes(facts.allocatable.memory_bytes),
        "node admission"
    );
    let protection_signal = facts.pressure_dir.clone();
    sup.set_node(facts);
    sup.recover().await?;
    match opts.protection {
        Some(cfg) if crate::pressure::psi::node().is_some() => {
            tracing::info!(settings = %cfg.describe(), "pressure protection on");
            sup.enable_protection(cfg, protection_signal).await;
            let sup = sup.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    sup.protect_round().await;
                }
            });
        }
        Some(_) => tracing::warn!("pressure protection off: this kernel reports no PSI"),
        None => tracing::info!("pressure protection off"),
    }
    if legacy.exists() {
        // Containers of the old layout were swept above; what is left is empty.
        let _ = crate::fsutil::remove_dir_all_if_exists(&legacy);
    }

    let token = match &opts.token_file {
        Some(f) => {
            let t = hyperbox_api::util::read_secret_file(f, "token")
                .map_err(anyhow::Error::msg)?
                .into_bytes();
            if t.len() < 16 {
                bail!(
                    "token file {}: the token must be at least 16 characters",
                    f.display()
                );
            }
            Some(t)
        }
        None => None,
    };
    let mut servers = tokio::task::JoinSet::new();
    {
        let sup = sup.clone();
        let socket = opts.socket.clone();
        servers.spawn(async move { crate::api::serve_unix(sup, &socket).await });
    }
    if let Some(addr) = opts.listen.clone() {
        let Some(token) = token else {
            bail!("--listen needs --token-file: the tcp api always requires a bearer token");
        };
        let tls = match &opts.tls {
            Some(t) => Some(crate::api::server_config(t)?),
            None => None,
        };
        let sup = sup.clone();
        servers.spawn(async move { crate::api::serve_tcp(sup, &addr, token, tls).await });
    }
    if let Some(addr) = opts.metrics_listen.clone() {
        let sup = sup.clone();
        servers.spawn(async move { crate::api::serve_metrics(sup, &addr).await });
    }
    if let Some((endpoint, interval)) = opts.otlp.clone() {
        let requests = crate::telemetry::otlp::spawn_sender(&endpoint)?;
        let sup = sup.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let req = crate::telemetry::otlp::request(&sup.telemetry_snapshot().await);
                // A collector slower than the interval gets the newest data, not a queue.
                if let Err(std::sync::mpsc::TrySendError::Disconnected(_)) = requests.try_send(req)
                {
                    return;
                }
            }
        });
    }
    {
        let sup = sup.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            let mut n: u64 = 0;
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        sup.rotate_logs().await;
                        sup.sample_pressure().await;
                        n += 1;
                        if n.is_multiple_of(30) {
                            sup.gc_images().await;
                        }
                    }
                    _ = sup.gc_requested() => sup.gc_images().await,
                }
            }
        });
    }
    if let Some((api, reg)) = opts.kubernetes.clone() {
        tokio::spawn(crate::cluster::run(sup.clone(), api, reg));
    }
    {
        // Prewarming pulls in its own task: a long pull holds up neither log rotation nor
        // pressure sampling.
        let sup = sup.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = sup.prewarm_requested() => {}
                }
                // Several wanted images: one after the other without waiting for a tick.
                while sup.prewarm_round().await {}
            }
        });
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = servers.join_next() => {
            match r {
                Some(Ok(Err(e))) => return Err(e),
                Some(Err(e)) => bail!("server task: {e}"),
                _ => {}
            }
        }
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted"),
        _ = term.recv() => tracing::info!("terminated"),
    }
    // Containers keep running; the next start re-adopts them (live restore).
    sup.detach_all().await;
    // The cgroup parent goes when no container is left in it (rmdir fails otherwise).
    for parent in crate::containers::cgroup_parent_dirs(&opts.cgroup_parent) {
        let _ = std::fs::remove_dir(parent);
    }
    let _ = std::fs::remove_file(&opts.socket);
    tracing::info!("node runtime stopped; containers left running for re-adoption");
    Ok(())
}
