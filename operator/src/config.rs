//! `/etc/hyperbox/operator.toml`: the settings of `hyperbox-operator git`, one key per flag
//! (see `hyperbox_client::config` for how the file and the command line combine).

use std::path::PathBuf;

use hyperbox_client::config::ConfigFile;

hyperbox_client::config_file! {
    /// The keys of the operator's config file, each the long name of a flag of `git`.
    pub struct OperatorConfig {
        repo: String,
        branch: String,
        tag: String,
        commit: String,
        path: String,
        interval: String,
        node: Vec<String>,
        node_grace: String,
        node_watch: bool,
        node_watch_timeout: String,
        pressure_weights: String,
        node_token_file: PathBuf,
        node_ca_file: PathBuf,
        node_cert: PathBuf,
        node_key: PathBuf,
        node_connect_timeout: String,
        node_timeout: String,
        git_connect_timeout: String,
        git_timeout: String,
        state_dir: PathBuf,
        webhook_listen: String,
        webhook_secret_file: PathBuf,
        prune: bool,
        token_file: PathBuf,
        username: String,
        ssh_key: PathBuf,
        known_hosts: PathBuf,
        verify_signatures: PathBuf,
        log_format: String,
    }
}

impl ConfigFile for OperatorConfig {
    const SUBCOMMAND: &'static str = "git";
    /// `--once` is a one-shot run, not a setting of the service.
    const CLI_ONLY: &'static [&'static str] = &["config", "check-config", "once"];
    const INLINE_SECRETS: &'static [(&'static str, &'static str)] = &[
        ("token", "token-file"),
        ("password", "token-file"),
        ("node-token", "node-token-file"),
        ("webhook-secret", "webhook-secret-file"),
    ];
    const SECRET_PATHS: &'static [&'static str] = &[
        "token-file",
        "ssh-key",
        "webhook-secret-file",
        "node-token-file",
        "node-key",
    ];
}

/// The package's documented default config (every key, commented out, with its default).
pub const DEFAULT_CONFIG: &str = include_str!("../../node-runtime/packaging/etc/operator.toml");
