use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use hyperbox_api::client::{Endpoint, NodeClient};
use hyperbox_api::cliutil::{init_tracing, parse_duration, run_main};
use hyperbox_operator::gitsource::{GitAuth, GitConfig, GitRef, GitSource};
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
}

#[derive(clap::Args)]
struct GitArgs {
    #[arg(long)]
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
    /// Node API: unix://PATH or http://HOST:PORT (with --node-token-file).
    #[arg(long)]
    node: String,
    #[arg(long)]
    node_token_file: Option<PathBuf>,
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

fn main() -> ExitCode {
    run_main(run(Cli::parse()))
}

async fn run(cli: Cli) -> Result<bool> {
    match cli.command {
        Command::Validate { paths } => Ok(hyperbox_operator::validate::run(&paths)? == 0),
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
                repo,
                branch,
                tag,
                commit,
                path,
                interval,
                node,
                node_token_file,
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
                Some(f) => Some(
                    std::fs::read_to_string(f)
                        .with_context(|| format!("read {}", f.display()))?
                        .trim()
                        .to_string(),
                ),
                None => None,
            };
            let client = NodeClient::new(Endpoint::parse(&node, token));
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
            let mut syncer = Syncer::new(
                source,
                client,
                SyncOptions {
                    state_dir: state_dir.clone(),
                    interval,
                    prune,
                    verify_signatures,
                },
            )?;
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
            tokio::select! {
                _ = syncer.run(trigger) => {}
                _ = tokio::signal::ctrl_c() => tracing::info!("interrupted"),
                _ = term.recv() => tracing::info!("terminated"),
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
