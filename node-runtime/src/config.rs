//! `/etc/hyperbox/node.toml`: the settings of `hyperbox-node serve`, one key per flag (see
//! `hyperbox_client::config` for how the file and the command line combine).

use std::path::PathBuf;

use hyperbox_client::config::ConfigFile;

hyperbox_client::config_file! {
    /// The keys of the node's config file, each the long name of a flag of `serve`.
    pub struct NodeConfig {
        socket: PathBuf,
        state_dir: PathBuf,
        run_dir: PathBuf,
        cgroup_parent: String,
        log_format: String,
        label: Vec<String>,
        reserve: String,
        allow_host_path: Vec<PathBuf>,
        allow_net_raw: bool,
        insecure_registry: Vec<String>,
        registry_auth_file: PathBuf,
        registry_ca: Vec<PathBuf>,
        max_image_bytes: u64,
        allow_image_devices: bool,
        image_store: String,
        pressure_admission: String,
        pressure_protection: String,
        image_keep_for: String,
        backoff_base: String,
        backoff_max: String,
        log_max_bytes: u64,
        metrics_listen: String,
        listen: String,
        token_file: PathBuf,
        tls_cert: PathBuf,
        tls_key: PathBuf,
        client_ca: PathBuf,
        kubeconfig: String,
        node_name: String,
        advertise_address: String,
        heartbeat_interval: String,
        ebpf: String,
        otlp_endpoint: String,
        otlp_interval: String,
    }
}

impl ConfigFile for NodeConfig {
    const SUBCOMMAND: &'static str = "serve";
    /// `--server`, `--ca-file`, `--cert` and `--key` are the client's (global flags that
    /// `serve` ignores).
    const CLI_ONLY: &'static [&'static str] =
        &["config", "check-config", "server", "ca-file", "cert", "key"];
    const INLINE_SECRETS: &'static [(&'static str, &'static str)] = &[
        ("token", "token-file"),
        ("registry-auth", "registry-auth-file"),
    ];
    const SECRET_PATHS: &'static [&'static str] = &["token-file", "tls-key", "registry-auth-file"];
}

/// The package's documented default config (every key, commented out, with its default).
pub const DEFAULT_CONFIG: &str = include_str!("../packaging/etc/node.toml");
