use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{CommandFactory, Parser, Subcommand};
use hyperbox_api::util::{parse_duration, read_secret_file};
use hyperbox_client::buildinfo::{long_version, Feature};
use hyperbox_client::cli::{init_tracing, init_tracing_with, parse_with_config, run_main};
use hyperbox_client::clidocs::{completion_script, write_man_pages, Shell};
use hyperbox_client::{Endpoint, NodeClient};
use hyperbox_node::config::NodeConfig;
use hyperbox_node::daemon::{serve, ServeOptions};
use hyperbox_node::workloads::SupervisorConfig;

/// HyperBox node runtime: runs Workloads as supervised containers on this machine, and is its
/// own client.
#[derive(Parser)]
#[command(name = "hyperbox-node", version)]
struct Cli {
    /// Unix socket of the node API.
    #[arg(
        long,
        global = true,
        default_value = "/run/hyperbox/node.sock",
        env = "HYPERBOX_SOCKET"
    )]
    socket: PathBuf,
    /// Talk to a remote node over TCP instead (http://HOST:PORT or https://HOST:PORT); needs
    /// --token-file.
    #[arg(long, global = true)]
    server: Option<String>,
    /// CA certificate (PEM) the node's TLS certificate must chain to (https:// servers).
    #[arg(long, global = true)]
    ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM) for nodes that require them (mTLS).
    #[arg(long, global = true, requires = "key")]
    cert: Option<PathBuf>,
    #[arg(long, global = true, requires = "cert")]
    key: Option<PathBuf>,
    /// Bearer token for --server (client) or --listen (daemon).
    #[arg(long, global = true)]
    token_file: Option<PathBuf>,
    /// Log format of the daemon: text or json.
    #[arg(
        long,
        global = true,
        default_value = "text",
        env = "HYPERBOX_LOG_FORMAT"
    )]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the node daemon.
    Serve {
        /// Read settings from this TOML file (the package's: /etc/hyperbox/node.toml). Each key
        /// is a flag's long name; a flag given on the command line wins over the file.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Print the effective settings (flags, --config file, defaults) as TOML and exit.
        #[arg(long)]
        check_config: bool,
        #[arg(long, default_value = "/var/lib/hyperbox")]
        state_dir: PathBuf,
        /// Per-boot runtime state; must not survive a reboot (tmpfs, like runc's /run/runc).
        #[arg(long, default_value = "/run/hyperbox")]
        run_dir: PathBuf,
        /// Also serve the API on TCP (bearer token required).
        #[arg(long)]
        listen: Option<String>,
        /// Serve the TCP API over TLS with this certificate (PEM, with its chain).
        #[arg(long, requires = "tls_key", requires = "listen")]
        tls_cert: Option<PathBuf>,
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Require client certificates signed by this CA (mTLS) on the TLS listener.
        #[arg(long, requires = "tls_cert")]
        client_ca: Option<PathBuf>,
        /// Serve Prometheus metrics at /metrics on this address.
        #[arg(long)]
        metrics_listen: Option<String>,
        /// Registry reached over plain HTTP (repeatable), e.g. 127.0.0.1:5000.
        #[arg(long = "insecure-registry")]
        insecure_registries: Vec<String>,
        /// docker config.json style registry credentials.
        #[arg(long)]
        registry_auth_file: Option<PathBuf>,
        /// Extra CA certificate (PEM) to trust for HTTPS registries (repeatable).
        #[arg(long = "registry-ca")]
        registry_ca: Vec<PathBuf>,
        /// First restart back-off (doubles per crash, like kubelet's CrashLoopBackOff).
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        backoff_base: Duration,
        #[arg(long, default_value = "300s", value_parser = parse_duration)]
        backoff_max: Duration,
        /// Keep unused images this long before garbage collection.
        #[arg(long, default_value = "10m", value_parser = parse_duration)]
        image_keep_for: Duration,
        /// Per-replica log file cap before rotation.
        #[arg(long, default_value_t = 10 << 20)]
        log_max_bytes: u64,
        /// Cap on an image's unpacked size (decompression bombs).
        #[arg(long, default_value_t = 16 << 30)]
        max_image_bytes: u64,
        /// Allow device nodes in image layers.
        #[arg(long)]
        allow_image_devices: bool,
        /// Refuse new replicas while a PSI signal (the higher of the host's and the node's
        /// workloads') is above a threshold: RESOURCE.KIND.WINDOW=PERCENT, or `off`.
        #[arg(long, default_value = "memory.full.avg10=10")]
        pressure_admission: hyperbox_node::pressure::admission::PressureAdmission,
        /// Under sustained memory pressure, throttle and then evict the lowest-priority
        /// replicas (reason EvictedForPressure): `on`, `off`, or settings over the defaults,
        /// `throttle=10,evict=20,release=2,sustain=3s,cooldown=5s,release-after=30s,restore-after=60s`.
        #[arg(long, default_value = "on")]
        pressure_protection: hyperbox_node::pressure::protect::PressureProtection,
        /// How images are prepared: `layers` (one EROFS per layer, shared between images,
        /// stacked by overlayfs) or `flattened` (one EROFS per image).
        #[arg(long, default_value = "layers", value_parser = ["layers", "flattened"])]
        image_store: String,
        #[arg(long, default_value = "/hyperbox")]
        cgroup_parent: String,
        /// Let hostPath volumes use this directory (repeatable). Without it, only HyperBox's
        /// own volumes dir is allowed.
        #[arg(long = "allow-host-path")]
        allow_host_paths: Vec<PathBuf>,
        /// Grant containers CAP_NET_RAW (raw sockets, ping). Off by default.
        #[arg(long)]
        allow_net_raw: bool,
        /// A node label, key=value (repeatable); nodeSelectors match these and the built-in
        /// kubernetes.io/hostname, kubernetes.io/arch and kubernetes.io/os.
        #[arg(long = "label", value_parser = hyperbox_node::pressure::admission::parse_label)]
        labels: Vec<(String, String)>,
        /// Held back from admission for the system and HyperBox itself: allocatable is the
        /// capacity minus this (like kubelet's --system-reserved).
        #[arg(long, default_value = "cpu=100m,memory=256Mi", value_parser = hyperbox_node::pressure::admission::parse_amounts)]
        reserve: hyperbox_api::ResourceAmounts,
        /// Register with a Kubernetes API server as a HyperNode and heartbeat it: a kubeconfig
        /// file, or `in-cluster` (the service account of the pod, for the DaemonSet). Needs
        /// --listen: the operator reaches the node over TCP.
        #[arg(long, value_name = "FILE|in-cluster", requires = "listen")]
        kubeconfig: Option<String>,
        /// The HyperNode's name (default: the host name).
        #[arg(long)]
        node_name: Option<String>,
        /// The node API address the operator should use (default: from --listen, https:// with
        /// --tls-cert, the host name in place of 0.0.0.0).
        #[arg(long)]
        advertise_address: Option<String>,
        /// How often the HyperNode's status (heartbeat, capacity, pressure) is written.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        heartbeat_interval: Duration,
        /// Per-container eBPF telemetry (execs, exits, OOM kills, run-queue latency, network
        /// and TCP counters): `auto` loads it where the kernel allows and says why not
        /// otherwise; `off` never loads it. Cgroup and runtime metrics are exported either way.
        #[arg(long, default_value = "auto", value_name = "auto|off")]
        ebpf: hyperbox_node::telemetry::EbpfMode,
        /// Export metrics and the daemon's traces over OTLP/HTTP (protobuf) to this collector
        /// base URL (`/v1/metrics` and `/v1/traces` are appended), e.g. http://127.0.0.1:4318.
        #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_name = "URL")]
        otlp_endpoint: Option<String>,
        /// How often metrics are pushed to --otlp-endpoint.
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        otlp_interval: Duration,
    },
    /// Apply Workload documents from a YAML file (- for stdin).
    Apply {
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        /// Return without waiting for the containers to start.
        #[arg(long)]
        no_wait: bool,
        #[arg(long, default_value = "300s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Pull and prepare an image (pull, unpack, EROFS, mount) without running it.
    Pull { image: String },
    /// Remove a prepared image (unmount, delete; refused while a workload uses it).
    Rmi { image: String },
    /// Show workloads.
    Get {
        /// NAME or NAMESPACE/NAME; all workloads when left out.
        name: Option<String>,
        /// Namespace of NAME (NAME may also be written NAMESPACE/NAME); default: `default`.
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        #[arg(short = 'o', long, default_value = "")]
        output: String,
    },
    /// Print a workload's container output.
    Logs {
        /// NAME or NAMESPACE/NAME.
        name: String,
        /// Namespace of NAME (NAME may also be written NAMESPACE/NAME); default: `default`.
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        #[arg(long)]
        replica: Option<u32>,
        /// Last N bytes only.
        #[arg(long)]
        tail: Option<u64>,
    },
    /// Stop and remove a workload.
    Delete {
        /// NAME or NAMESPACE/NAME.
        name: String,
        /// Namespace of NAME (NAME may also be written NAMESPACE/NAME); default: `default`.
        #[arg(short = 'n', long)]
        namespace: Option<String>,
    },
    /// Restart a workload's replicas as new containers (one with --replica).
    Restart {
        /// NAME or NAMESPACE/NAME.
        name: String,
        /// Namespace of NAME (NAME may also be written NAMESPACE/NAME); default: `default`.
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        #[arg(long)]
        replica: Option<u32>,
    },
    /// Capacity, allocations, pressure and features of this node.
    Node {
        #[arg(short = 'o', long, default_value = "")]
        output: String,
    },
    /// Print the version, the Git commit and the features of this build and machine.
    Version,
    /// Print a shell completion script (bash, zsh or fish) to stdout.
    #[command(hide = true)]
    Completions { shell: Shell },
    /// Write man pages (one per command) into DIR.
    #[command(hide = true)]
    Man { dir: PathBuf },
}

/// What this build has and what this machine offers it: whether the eBPF programs were
/// compiled in (whether they load is up to the kernel when `serve` starts: `node -o json`);
/// EROFS depends on the kernel and mkfs.erofs, so it is looked up now.
fn features() -> Vec<Feature> {
    let erofs = hyperbox_node::images::erofs::ErofsSupport::detect();
    vec![
        Feature::new(
            "ebpf",
            match hyperbox_node::telemetry::ebpf::BUILD {
                "built" => "built (telemetry programs load when serve starts; see node -o json)"
                    .to_string(),
                other => other.to_string(),
            },
        ),
        Feature::new(
            "erofs",
            match (&erofs.mkfs, &erofs.reason) {
                (Some(mkfs), _) => format!("available (detected at run time; {})", mkfs.display()),
                (None, reason) => format!(
                    "unavailable (detected at run time: {})",
                    reason.as_deref().unwrap_or("unknown reason")
                ),
            },
        ),
    ]
}

/// The key of NAME as given on the command line (`-n NAMESPACE NAME` or `NAMESPACE/NAME`).
fn workload_key(namespace: Option<&str>, name: &str) -> String {
    match namespace {
        Some(ns) => hyperbox_api::workload_key(ns, name),
        None => hyperbox_api::normalize_key(name),
    }
}

fn main() -> ExitCode {
    // The container spawner: a single-threaded helper the daemon starts (see
    // `containers::spawner`). Checked before anything else runs, so it never has a second thread.
    if std::env::args().nth(1).as_deref() == Some(hyperbox_node::containers::spawner::SPAWNER_ARG) {
        hyperbox_node::containers::spawner::serve();
    }
    run_main(run(parse_with_config::<Cli, NodeConfig>(features)))
}

async fn run(cli: Cli) -> Result<bool> {
    let client = || -> Result<NodeClient> {
        let endpoint = match &cli.server {
            Some(s) => {
                let token = match &cli.token_file {
                    Some(f) => Some(read_secret_file(f, "token").map_err(anyhow::Error::msg)?),
                    None => None,
                };
                Endpoint::parse_tls(
                    s,
                    token,
                    &hyperbox_client::tls::TlsFiles {
                        ca_file: cli.ca_file.clone(),
                        cert: cli.cert.clone(),
                        key: cli.key.clone(),
                    },
                )
                .map_err(anyhow::Error::msg)?
            }
            None => Endpoint::Unix(cli.socket.clone()),
        };
        Ok(NodeClient::new(endpoint))
    };
    match &cli.command {
        Command::Serve {
            config: _,
            check_config: _,
            state_dir,
            run_dir,
            listen,
            tls_cert,
            tls_key,
            client_ca,
            metrics_listen,
            insecure_registries,
            registry_auth_file,
            registry_ca,
            backoff_base,
            backoff_max,
            image_keep_for,
            log_max_bytes,
            max_image_bytes,
            allow_image_devices,
            image_store,
            pressure_admission,
            pressure_protection,
            cgroup_parent,
            allow_host_paths,
            allow_net_raw,
            labels,
            reserve,
            kubeconfig,
            node_name,
            advertise_address,
            heartbeat_interval,
            ebpf,
            otlp_endpoint,
            otlp_interval,
        } => {
            let filter = "info,libcontainer=warn,libcgroups=error";
            // One name for the node everywhere: traces, metrics and the HyperNode.
            let node = node_name
                .clone()
                .unwrap_or_else(hyperbox_node::pressure::host::hostname);
            let mut tracer = None;
            match otlp_endpoint {
                Some(endpoint) => {
                    let (layer, provider) =
                        hyperbox_node::telemetry::otlp::trace_layer(endpoint, &node)?;
                    init_tracing_with(&cli.log_format, filter, Some(layer));
                    tracer = Some(provider);
                }
                None => init_tracing(&cli.log_format, filter),
            }
            let served = serve(ServeOptions {
                state_dir: state_dir.clone(),
                run_dir: run_dir.clone(),
                socket: cli.socket.clone(),
                listen: listen.clone(),
                token_file: cli.token_file.clone(),
                tls: match (tls_cert, tls_key) {
                    (Some(cert), Some(key)) => Some(hyperbox_node::api::ServerTls {
                        cert: cert.clone(),
                        key: key.clone(),
                        client_ca: client_ca.clone(),
                    }),
                    _ => None,
                },
                metrics_listen: metrics_listen.clone(),
                insecure_registries: insecure_registries.clone(),
                auth_file: registry_auth_file.clone(),
                registry_ca: registry_ca.clone(),
                supervisor: SupervisorConfig {
                    backoff_base: *backoff_base,
                    backoff_max: *backoff_max,
                    image_keep_for: *image_keep_for,
                    log_max_bytes: *log_max_bytes,
                    ..Default::default()
                },
                max_unpacked_bytes: *max_image_bytes,
                allow_devices: *allow_image_devices,
                layered: image_store == "layers",
                cgroup_parent: cgroup_parent.clone(),
                allow_host_paths: allow_host_paths.clone(),
                allow_net_raw: *allow_net_raw,
                labels: labels.clone(),
                reserve: *reserve,
                pressure_gate: pressure_admission.0,
                protection: pressure_protection.0,
                node_name: node.clone(),
                ebpf: *ebpf,
                otlp: otlp_endpoint.clone().map(|e| (e, *otlp_interval)),
                kubernetes: match kubeconfig {
                    Some(k) => {
                        let name = node.clone();
                        hyperbox_node::cluster::check_node_name(&name)
                            .map_err(anyhow::Error::msg)?;
                        let api = hyperbox_node::cluster::ApiServer::load(k).await?;
                        let address = advertise_address.clone().unwrap_or_else(|| {
                            hyperbox_node::cluster::default_address(
                                listen.as_deref().unwrap_or_default(),
                                tls_cert.is_some(),
                                &hyperbox_node::pressure::host::hostname(),
                            )
                        });
                        Some((
                            api,
                            hyperbox_node::cluster::Registration {
                                name,
                                address,
                                interval: *heartbeat_interval,
                            },
                        ))
                    }
                    None => None,
                },
            })
            .await;
            if let Some(p) = tracer {
                // Send the spans still batched.
                let _ = tokio::task::spawn_blocking(move || p.shutdown()).await;
            }
            served?;
            Ok(true)
        }
        Command::Apply {
            file,
            no_wait,
            timeout,
        } => hyperbox_node::cli::apply(&client()?, file, !no_wait, *timeout).await,
        Command::Pull { image } => hyperbox_node::cli::pull(&client()?, image).await,
        Command::Rmi { image } => {
            let digest = client()?.remove_image(image).await?;
            println!("removed {image} ({digest})");
            Ok(true)
        }
        Command::Get {
            name,
            namespace,
            output,
        } => {
            let key = name
                .as_deref()
                .map(|n| workload_key(namespace.as_deref(), n));
            hyperbox_node::cli::get(&client()?, key.as_deref(), output).await?;
            Ok(true)
        }
        Command::Logs {
            name,
            namespace,
            replica,
            tail,
        } => {
            let key = workload_key(namespace.as_deref(), name);
            let body = client()?.logs(&key, *replica, *tail).await?;
            std::io::Write::write_all(&mut std::io::stdout(), &body)?;
            Ok(true)
        }
        Command::Delete { name, namespace } => {
            let name = workload_key(namespace.as_deref(), name);
            client()?.delete(&name).await?;
            println!("workload/{name} deleted");
            Ok(true)
        }
        Command::Restart {
            name,
            namespace,
            replica,
        } => {
            let name = workload_key(namespace.as_deref(), name);
            client()?.restart(&name, *replica).await?;
            match replica {
                Some(n) => println!("workload/{name} replica {n} restarting"),
                None => println!("workload/{name} restarting"),
            }
            Ok(true)
        }
        Command::Node { output } => {
            hyperbox_node::cli::node(&client()?, output).await?;
            Ok(true)
        }
        Command::Version => {
            println!("hyperbox-node {}", long_version(&features()));
            Ok(true)
        }
        Command::Completions { shell } => {
            let script = completion_script(Cli::command(), *shell);
            std::io::Write::write_all(&mut std::io::stdout(), &script)?;
            Ok(true)
        }
        Command::Man { dir } => {
            for page in write_man_pages(Cli::command(), dir)? {
                println!("{}", page.display());
            }
            Ok(true)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyperbox_client::config::{check_one_to_one, check_template};

    #[test]
    fn config_keys_are_the_flags_of_serve() {
        check_one_to_one::<NodeConfig>(&Cli::command()).unwrap();
    }

    #[test]
    fn the_packaged_config_documents_every_key_with_its_default() {
        check_template::<NodeConfig>(&Cli::command(), hyperbox_node::config::DEFAULT_CONFIG)
            .unwrap();
    }
}
