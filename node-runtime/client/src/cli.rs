//! What both binaries' `main` share: logging setup and the async runtime around a command.

use crate::buildinfo::{long_version, long_version_requested, short_version, Feature};
use crate::config::{self, ConfigFile};

/// A layer added beside the log output (the node's OpenTelemetry span export).
pub type ExtraLayer =
    Box<dyn tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync + 'static>;

/// Logs to stderr through `tracing`: text (colored on a terminal) or JSON. `RUST_LOG`
/// overrides `default_filter`.
pub fn init_tracing(format: &str, default_filter: &str) {
    init_tracing_with(format, default_filter, None)
}

/// [`init_tracing`] plus an extra layer that sees the same (filtered) spans and events.
pub fn init_tracing_with(format: &str, default_filter: &str, extra: Option<ExtraLayer>) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let registry = tracing_subscriber::registry().with(extra).with(filter);
    if format == "json" {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .init();
    } else {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(ansi)
                    .with_writer(std::io::stderr),
            )
            .init();
    }
}

/// Runs a command's async body on a multi-threaded runtime and maps its outcome to the exit
/// code: `Ok(true)` success, `Ok(false)` failure already reported, `Err` printed as
/// `error: ...` with its whole context chain.
pub fn run_main<F, E>(body: F) -> std::process::ExitCode
where
    F: std::future::Future<Output = Result<bool, E>>,
    E: std::fmt::Display,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(body) {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The top-level command of a binary whose `--version` lists features found at run time:
/// `features` is only called when `--version` is given. `-V` prints the one-line version.
fn versioned_command<T: clap::Parser>(features: impl FnOnce() -> Vec<Feature>) -> clap::Command {
    // Parsed once per process: leaking the two strings is what clap's `string` feature
    // would do for us without the extra build.
    let mut cmd = T::command().version(&*short_version().leak());
    if long_version_requested() {
        cmd = cmd.long_version(&*long_version(&features()).leak());
    }
    cmd
}

/// Parses the command line of a binary whose `--version` lists features found at run time.
pub fn parse_with_version<T: clap::Parser>(features: impl FnOnce() -> Vec<Feature>) -> T {
    let mut cmd = versioned_command::<T>(features);
    let matches = cmd.clone().get_matches();
    T::from_arg_matches(&matches).unwrap_or_else(|e| e.format(&mut cmd).exit())
}

/// As [`parse_with_version`], for a binary whose daemon subcommand (`C::SUBCOMMAND`) takes
/// `--config FILE` and `--check-config`: the file's keys fill the flags not given (see
/// [`crate::config`]). A config file that cannot be used is a usage error (exit status 2,
/// like a bad flag: systemd units do not restart on it). `--check-config` prints the
/// effective settings and exits.
pub fn parse_with_config<T: clap::Parser, C: ConfigFile>(
    features: impl FnOnce() -> Vec<Feature>,
) -> T {
    let mut cmd = versioned_command::<T>(features);
    let merged = match config::merge::<C>(&cmd, std::env::args_os().collect()) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let matches = match cmd.clone().try_get_matches_from(&merged.args) {
        Ok(m) => m,
        Err(e) => {
            if let (Some(file), clap::error::ErrorKind::MissingRequiredArgument) =
                (&merged.file, e.kind())
            {
                let _ = e.print();
                let keys: Vec<String> = match e.get(clap::error::ContextKind::InvalidArg) {
                    Some(clap::error::ContextValue::Strings(args)) => args
                        .iter()
                        .filter_map(|a| a.strip_prefix("--"))
                        .map(|a| format!("`{}`", a.split([' ', '=']).next().unwrap_or(a)))
                        .collect(),
                    _ => vec![],
                };
                eprintln!(
                    "note: or set {} in {}",
                    if keys.is_empty() {
                        "them".to_string()
                    } else {
                        keys.join(", ")
                    },
                    file.display()
                );
                std::process::exit(2);
            }
            e.exit()
        }
    };
    if matches
        .subcommand_matches(C::SUBCOMMAND)
        .is_some_and(|m| m.get_flag("check_config"))
    {
        print!("{}", config::render_effective::<C>(&cmd, &matches, &merged));
        std::process::exit(0);
    }
    T::from_arg_matches(&matches).unwrap_or_else(|e| e.format(&mut cmd).exit())
}
