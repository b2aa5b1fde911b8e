use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{CommandFactory, Parser, Subcommand};
use hyperbox_api::util::{parse_duration, read_secret_file};
use hyperbox_client::buildinfo::{long_version, Feature};
use hyperbox_client::cli::{init_tracing, parse_with_config};
use hyperbox_client::clidocs::{completion_script, write_man_pages, Shell};
use hyperbox_client::{Endpoint, NodeClient};
use hyperbox_operator::apply::Limits;
use hyperbox_operator::config::OperatorConfig;
use hyperbox_operator::gitsource::{set_network_timeouts, GitAuth, GitConfig, GitRef, GitSource};
use hyperbox_operator::sync::{status_path, SourceStatus, SyncOptions, Syncer};

/// HyperBox operator: reconciles desired Workloads from a source onto node runtimes.
#[derive(Parser)]
#[command(name = "hyperbox-operator", version)]
struct Cli {
    /// Log format: text or json.
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

#[derive(Subcommand)]
enum Command {
    /// Reconcile a Git repository of Workload manifests onto a node (edge mode).
    Git(Box<GitArgs>),
    /// Check a Git repository (reachable, every manifest valid) and write the config file of
    /// `git` for it. Writes nothing when the check fails.
    Init(InitArgs),
    /// Show the Git source's state: revisions, per-file and per-workload results.
    Status {
        #[arg(long, default_value = "/var/lib/hyperbox-operator")]
        state_dir: PathBuf,
        #[arg(short = 'o', long, default_value = "")]
        output: String,
    },
    /// Check manifests offline; prints file:line: field: message and exits non-zero on errors.
    Validate {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Reconcile Workload custom resources onto the node runtimes registered as HyperNodes.
    Kubernetes(Box<KubeArgs>),
    /// Print the CustomResourceDefinitions (Workload, HyperNode) as YAML.
    Crd,
    /// Print the version, the Git commit and the features of this build.
    Version,
    /// Print a shell completion script (bash, zsh or fish) to stdout.
    #[command(hide = true)]
    Completions { shell: Shell },
    /// Write man pages (one per command) into DIR.
    #[command(hide = true)]
    Man { dir: PathBuf },
}

/// The operator runs no containers: EROFS and eBPF are the node's. What it has is Git over
/// HTTPS and SSH (libgit2).
fn features() -> Vec<Feature> {
    vec![
        Feature::new("git", "https, ssh (libgit2)"),
        Feature::new("ebpf", "not built"),
        Feature::new(
            "erofs",
            "not used (the node runtime builds and mounts images)",
        ),
    ]
}

#[derive(clap::Args)]
struct InitArgs {
    /// The Git repository of Workload manifests (https://, ssh://, git://, file:// or a path).
    #[arg(long, value_parser = clap::builder::NonEmptyStringValueParser::new())]
    repo: String,
    /// Follow this branch (the remote's HEAD without it).
    #[arg(long)]
    branch: Option<String>,
    /// Directory of the repository holding the manifests.
    #[arg(long, default_value = "")]
    path: String,
    /// Node API the operator will use (repeatable); the local node's socket by default.
    #[arg(long, default_value = "unix:///run/hyperbox/node.sock")]
    node: Vec<String>,
    /// HTTPS token or password file (written to the config by path).
    #[arg(long)]
    token_file: Option<PathBuf>,
    #[arg(long)]
    username: Option<String>,
    /// SSH private key file (written to the config by path).
    #[arg(long)]
    ssh_key: Option<PathBuf>,
    #[arg(long)]
    known_hosts: Option<PathBuf>,
    /// The config file to write.
    #[arg(
        long,
        default_value = "/etc/hyperbox/operator.toml",
        value_name = "FILE"
    )]
    config: PathBuf,
    /// Replace the config file if it exists.
    #[arg(long)]
    force: bool,
}

#[derive(clap::Args)]
struct KubeArgs {
    /// Kubeconfig to use; without it: in-cluster (the pod's service account), else
    /// $KUBECONFIG or ~/.kube/config.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Bearer token for the nodes' APIs (their --token-file).
    #[arg(long)]
    node_token_file: Option<PathBuf>,
    /// CA certificate (PEM) the nodes' TLS certificates chain to (https:// nodes).
    #[arg(long, alias = "node-ca-file")]
    node_ca: Option<PathBuf>,
    /// Client certificate and key (PEM) for nodes that require them (mTLS).
    #[arg(long, requires = "node_key")]
    node_cert: Option<PathBuf>,
    #[arg(long, requires = "node_cert")]
    node_key: Option<PathBuf>,
    /// Also talk to nodes whose HyperNode address is plain http:// (by default only https://
    /// addresses are used: the node token must not travel in the clear).
    #[arg(long)]
    allow_http_nodes: bool,
    /// A node whose last heartbeat is older than this is marked Ready=False (kube's
    /// node-monitor-grace-period).
    #[arg(long, default_value = "40s", value_parser = parse_duration)]
    node_monitor_grace: Duration,
    /// A node not ready for this long loses its replicas to other nodes.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    node_grace: Duration,
    /// How long one long-poll of a node's workloads is held.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    node_watch_timeout: Duration,
    /// Names this cluster in the manager of every workload it places
    /// (`kubernetes:<cluster>/<uid>`): another cluster or a Git source never overwrites them.
    #[arg(long, default_value = "kubernetes")]
    cluster_name: String,
    /// How node pressure ranks nodes for new replicas (see `git --pressure-weights`).
    #[arg(long, default_value = "cpu=1,memory=2,io=1,trend=1,band=10")]
    pressure_weights: hyperbox_operator::fleet_core::placement::PressureWeights,
    /// Elect a leader on a Lease, so that several replicas can run and only one acts.
    #[arg(long, default_value = "true", action = clap::ArgAction::Set)]
    leader_elect: bool,
    #[arg(long, default_value = "hyperbox-operator")]
    lease_name: String,
    /// Namespace of the Lease (default: the pod's namespace, else `default`).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// This replica's name in the Lease (default: the pod's name, else host name and pid).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// A lease not renewed for this long is taken over by another replica.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    lease_duration: Duration,
    /// Workloads reconciled at once.
    #[arg(long, default_value_t = 16)]
    concurrency: u16,
}

#[derive(clap::Args)]
struct GitArgs {
    /// Read settings from this TOML file (the package's: /etc/hyperbox/operator.toml). Each
    /// key is a flag's long name; a flag given on the command line wins over the file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print the effective settings (flags, --config file, defaults) as TOML and exit.
    #[arg(long)]
    check_config: bool,
    /// The Git repository of Workload manifests (https://, ssh:// or a local path).
    #[arg(long, value_parser = clap::builder::NonEmptyStringValueParser::new())]
    repo: String,
    #[arg(long, conflicts_with_all = ["tag", "commit"])]
    branch: Option<String>,
    #[arg(long, conflicts_with = "commit")]
    tag: Option<String>,
    #[arg(long)]
    commit: Option<String>,
    /// Directory of the repository holding the manifests.
    #[arg(long, default_value = "")]
    path: String,
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    interval: Duration,
    /// Node API: unix://PATH, http://HOST:PORT or https://HOST:PORT (with
    /// --node-token-file). Repeat it to spread replicas over several nodes.
    #[arg(long, required = true)]
    node: Vec<String>,
    /// With several nodes: how long a node may stay unreachable before its replicas move.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    node_grace: Duration,
    /// Watch each node's workloads (one long-poll per node) instead of listing them at every
    /// sync: drift is repaired as it happens, and a quiet node costs a small answer per
    /// --node-watch-timeout. `false` polls at --interval.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    node_watch: bool,
    /// How long a node holds one watch request open when nothing changes.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    node_watch_timeout: Duration,
    /// With several nodes: how node pressure (PSI `some avg10` of the host and of the node's
    /// workloads, and its rise) ranks nodes for new replicas, over the defaults
    /// `cpu=1,memory=2,io=1,trend=1,band=10`.
    #[arg(long, default_value = "cpu=1,memory=2,io=1,trend=1,band=10")]
    pressure_weights: hyperbox_operator::fleet_core::placement::PressureWeights,
    #[arg(long)]
    node_token_file: Option<PathBuf>,
    /// CA certificate (PEM) the node's TLS certificate must chain to (https:// nodes).
    #[arg(long)]
    node_ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM) for nodes that require them (mTLS).
    #[arg(long, requires = "node_key")]
    node_cert: Option<PathBuf>,
    #[arg(long, requires = "node_cert")]
    node_key: Option<PathBuf>,
    /// Bound on connecting to the node API.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    node_connect_timeout: Duration,
    /// Bound on one node API request (send it, read the whole answer).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    node_timeout: Duration,
    /// Bound on connecting to the Git server.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    git_connect_timeout: Duration,
    /// Bound on each wait for the Git server (a read or a write of the fetch): a server that
    /// stalls this long fails the sync, which is retried with backoff.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    git_timeout: Duration,
    #[arg(long, default_value = "/var/lib/hyperbox-operator")]
    state_dir: PathBuf,
    #[arg(long)]
    webhook_listen: Option<String>,
    #[arg(long)]
    webhook_secret_file: Option<PathBuf>,
    /// Delete workloads removed from Git (only ones this source applied).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    prune: bool,
    /// HTTPS token or password file.
    #[arg(long)]
    token_file: Option<PathBuf>,
    #[arg(long)]
    username: Option<String>,
    #[arg(long)]
    ssh_key: Option<PathBuf>,
    #[arg(long)]
    known_hosts: Option<PathBuf>,
    /// Refuse heads without a valid signature from this GnuPG home dir or SSH
    /// allowed-signers file.
    #[arg(long)]
    verify_signatures: Option<PathBuf>,
    /// Sync once and exit (non-zero when the sync failed).
    #[arg(long)]
    once: bool,
}

/// How long an exiting operator waits for blocking work (a Git fetch that is stuck on the
/// network) before leaving it behind: the fetch is abandoned, never awaited.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

fn main() -> ExitCode {
    // Fetches and manifest parsing run on blocking threads, the node calls on the runtime's:
    // with glibc's default of one malloc arena per thread, memory freed by one is not reused
    // by the other, and a 10,000-workload sync peaked at 78 MiB instead of 71 MiB (77 MiB
    // with two arenas). The threads seldom allocate at the same time: one arena is enough.
    // SAFETY: mallopt before any other thread exists; it only tunes the allocator.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
    let cli: Cli = parse_with_config::<Cli, OperatorConfig>(features);
    if let Command::Init(args) = &cli.command {
        return init(args);
    }
    if let Command::Git(args) = &cli.command {
        // SAFETY: no other thread exists yet (the runtime starts below) and nothing fetches.
        if let Err(e) = unsafe { set_network_timeouts(args.git_connect_timeout, args.git_timeout) }
        {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let outcome = rt.block_on(run(cli));
    // Dropping the runtime would wait for every blocking thread, a hung fetch included.
    rt.shutdown_timeout(SHUTDOWN_GRACE);
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `init` runs before any async runtime: it only fetches and validates.
fn init(args: &InitArgs) -> ExitCode {
    use hyperbox_operator::gitsource::{DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT};
    // SAFETY: no other thread exists yet and nothing fetches.
    if let Err(e) = unsafe { set_network_timeouts(DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT) } {
        eprintln!("error: {e:#}");
        return ExitCode::FAILURE;
    }
    let opts = hyperbox_operator::init::InitOptions {
        repo: args.repo.clone(),
        branch: args.branch.clone(),
        path: args.path.clone(),
        node: args.node.clone(),
        auth: GitAuth {
            token_file: args.token_file.clone(),
            username: args.username.clone(),
            ssh_key: args.ssh_key.clone(),
            known_hosts: args.known_hosts.clone(),
        },
        config: args.config.clone(),
        force: args.force,
    };
    match hyperbox_operator::init::run(&opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<bool> {
    match cli.command {
        Command::Init(_) => unreachable!("init runs before the runtime"),
        Command::Validate { paths } => Ok(hyperbox_operator::validate::run(&paths)? == 0),
        Command::Kubernetes(a) => {
            init_tracing(&cli.log_format, "info,kube=warn");
            let a = *a;
            let token = match &a.node_token_file {
                Some(f) => Some(read_secret_file(f, "node token").map_err(anyhow::Error::msg)?),
                None => None,
            };
            let identity = a.identity.unwrap_or_else(|| {
                format!(
                    "{}-{}",
                    hyperbox_operator::k8s::hostname(),
                    std::process::id()
                )
            });
            hyperbox_operator::k8s::run(hyperbox_operator::k8s::KubeOptions {
                kubeconfig: a.kubeconfig,
                access: hyperbox_operator::k8s::nodes::NodeAccess {
                    token,
                    tls: hyperbox_client::tls::TlsFiles {
                        ca_file: a.node_ca,
                        cert: a.node_cert,
                        key: a.node_key,
                    },
                    fence: None,
                    allow_http: a.allow_http_nodes,
                },
                timings: hyperbox_operator::k8s::nodes::NodeTimings {
                    monitor_grace: a.node_monitor_grace,
                    eviction_grace: a.node_grace,
                    watch_timeout: a.node_watch_timeout,
                },
                cluster: a.cluster_name,
                weights: a.pressure_weights,
                lease: a.leader_elect.then(|| {
                    hyperbox_operator::k8s::lease::LeaseConfig::with_duration(
                        a.lease_name,
                        a.lease_namespace,
                        identity,
                        a.lease_duration,
                    )
                }),
                concurrency: a.concurrency.max(1),
            })
            .await?;
            Ok(true)
        }
        Command::Crd => {
            print!("{}", hyperbox_operator::k8s::crd::crds_yaml());
            Ok(true)
        }
        Command::Version => {
            println!("hyperbox-operator {}", long_version(&features()));
            Ok(true)
        }
        Command::Completions { shell } => {
            let script = completion_script(Cli::command(), shell);
            std::io::Write::write_all(&mut std::io::stdout(), &script)?;
            Ok(true)
        }
        Command::Man { dir } => {
            for page in write_man_pages(Cli::command(), &dir)? {
                println!("{}", page.display());
            }
            Ok(true)
        }
        Command::Status { state_dir, output } => {
            let path = status_path(&state_dir);
            let bytes = std::fs::read(&path).with_context(|| {
                format!("read {} (has the git source run yet?)", path.display())
            })?;
            let status: SourceStatus = serde_json::from_slice(&bytes)
                .with_context(|| format!("parse {}", path.display()))?;
            match output.as_str() {
                "json" => println!("{}", serde_json::to_string_pretty(&status)?),
                "yaml" => print!("{}", serde_norway::to_string(&status)?),
                "" => print_status(&status),
                other => bail!("unknown output format {other:?} (use json or yaml)"),
            }
            Ok(true)
        }
        Command::Git(args) => {
            let GitArgs {
                config: _,
                check_config: _,
                repo,
                branch,
                tag,
                commit,
                path,
                interval,
                node,
                node_grace,
                node_watch,
                node_watch_timeout,
                pressure_weights,
                node_token_file,
                node_ca_file,
                node_cert,
                node_key,
                node_connect_timeout,
                node_timeout,
                git_connect_timeout: _,
                git_timeout: _,
                state_dir,
                webhook_listen,
                webhook_secret_file,
                prune,
                token_file,
                username,
                ssh_key,
                known_hosts,
                verify_signatures,
                once,
            } = *args;
            init_tracing(&cli.log_format, "info");
            let reference = match (branch, tag, commit) {
                (Some(b), _, _) => GitRef::Branch(b),
                (_, Some(t), _) => GitRef::Tag(t),
                (_, _, Some(c)) => GitRef::Commit(c),
                _ => GitRef::Head,
            };
            let token = match &node_token_file {
                Some(f) => Some(read_secret_file(f, "node token").map_err(anyhow::Error::msg)?),
                None => None,
            };
            // This source's identity on the node: it never changes or prunes workloads that
            // another source manages.
            let manager = if path.is_empty() {
                format!("git:{repo}")
            } else {
                format!("git:{repo}#{path}")
            };
            let tls = hyperbox_client::tls::TlsFiles {
                ca_file: node_ca_file,
                cert: node_cert,
                key: node_key,
            };
            let mut clients = Vec::new();
            for n in &node {
                if clients.iter().any(|(k, _)| k == n) {
                    bail!("--node {n} is given twice");
                }
                let endpoint = Endpoint::parse_tls(n, token.clone(), &tls)
                    .map_err(|e| anyhow::anyhow!("--node {n}: {e}"))?;
                let client = NodeClient::new(endpoint)
                    .with_timeouts(node_connect_timeout, node_timeout)
                    .with_manager(manager.clone(), false);
                clients.push((n.clone(), client));
            }
            let source = GitSource::open(
                &state_dir.join("repo.git"),
                GitConfig {
                    url: repo,
                    reference,
                    path,
                    auth: GitAuth {
                        token_file,
                        username,
                        ssh_key,
                        known_hosts,
                    },
                },
            )?;
            let opts = SyncOptions {
                state_dir: state_dir.clone(),
                interval,
                prune,
                verify_signatures,
                apply_limits: Limits::default(),
                node_watch: node_watch.then_some(node_watch_timeout),
                pressure_weights,
            };
            let mut syncer = if clients.len() == 1 {
                let (_, client) = clients.pop().expect("one node");
                Syncer::new(source, client, opts)?
            } else {
                Syncer::new_fleet(source, clients, node_grace, opts)?
            };
            if once {
                return match syncer.sync_once().await {
                    Ok(()) => Ok(true),
                    Err(e) => {
                        eprintln!("error: {e:#}");
                        Ok(false)
                    }
                };
            }
            let trigger = Arc::new(tokio::sync::Notify::new());
            if let Some(addr) = webhook_listen {
                let Some(f) = webhook_secret_file else {
                    bail!("--webhook-listen needs --webhook-secret-file: unsigned webhooks are refused");
                };
                let secret = std::fs::read_to_string(&f)
                    .with_context(|| format!("read {}", f.display()))?
                    .trim()
                    .as_bytes()
                    .to_vec();
                if secret.is_empty() {
                    bail!("webhook secret file {} is empty", f.display());
                }
                let t = trigger.clone();
                tokio::spawn(async move {
                    if let Err(e) = hyperbox_operator::webhook::serve(&addr, secret, t).await {
                        tracing::error!(error = %format!("{e:#}"), "webhook receiver stopped");
                    }
                });
            }
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            // The sync's blocking Git work runs on blocking threads, so these are answered even
            // while a fetch hangs; the fetch is then left behind (see SHUTDOWN_GRACE).
            tokio::select! {
                _ = syncer.run(trigger) => {}
                _ = tokio::signal::ctrl_c() => tracing::info!("interrupted; stopping"),
                _ = term.recv() => tracing::info!("terminated; stopping"),
            }
            Ok(true)
        }
    }
}

fn print_status(s: &SourceStatus) {
    let rev = |r: &Option<String>| {
        r.as_deref()
            .map(|r| r.chars().take(12).collect::<String>())
            .unwrap_or_else(|| "-".into())
    };
    println!("source:    {} ({}) path {:?}", s.url, s.reference, s.path);
    println!(
        "fetched:   {}{}",
        rev(&s.last_fetched_revision),
        if s.stale { "  STALE" } else { "" }
    );
    println!("applied:   {}", rev(&s.last_applied_revision));
    if let Some(e) = &s.error {
        println!("error:     {e}");
    }
    if s.consecutive_failures > 0 {
        println!(
            "failing:   {} sync(s) in a row; retrying with backoff",
            s.consecutive_failures
        );
    }
    if let Some(ms) = s.last_sync_ms {
        println!("last sync: {ms} ms");
    }
    println!();
    println!("{:<40} {:<10} {:<30} MESSAGE", "WORKLOAD", "RESULT", "FILE");
    for w in &s.workloads {
        println!(
            "{:<40} {:<10} {:<30} {}",
            w.name,
            format!("{:?}", w.outcome).to_lowercase(),
            w.file.as_deref().unwrap_or("-"),
            w.message.as_deref().unwrap_or("")
        );
    }
    let errors: Vec<&String> = s.files.iter().flat_map(|f| f.errors.iter()).collect();
    if !errors.is_empty() {
        println!();
        println!("manifest problems:");
        for e in errors {
            println!("  {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyperbox_client::config::{check_one_to_one, check_template};

    #[test]
    fn config_keys_are_the_flags_of_git() {
        check_one_to_one::<OperatorConfig>(&Cli::command()).unwrap();
    }

    #[test]
    fn the_packaged_config_documents_every_key_with_its_default() {
        check_template::<OperatorConfig>(
            &Cli::command(),
            hyperbox_operator::config::DEFAULT_CONFIG,
        )
        .unwrap();
    }
}
