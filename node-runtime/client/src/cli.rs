//! What both binaries' `main` share: logging setup and the async runtime around a command.

use crate::buildinfo::{long_version, long_version_requested, short_version, Feature};

/// Logs to stderr through `tracing`: text (colored on a terminal) or JSON. `RUST_LOG`
/// overrides `default_filter`.
pub fn init_tracing(format: &str, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
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

/// Parses the command line of a binary whose `--version` lists features found at run time:
/// `features` is only called when `--version` is given. `-V` prints the one-line version.
pub fn parse_with_version<T: clap::Parser>(features: impl FnOnce() -> Vec<Feature>) -> T {
    // Parsed once per process: leaking the two strings is what clap's `string` feature
    // would do for us without the extra build.
    let mut cmd = T::command().version(&*short_version().leak());
    if long_version_requested() {
        cmd = cmd.long_version(&*long_version(&features()).leak());
    }
    let matches = cmd.clone().get_matches();
    T::from_arg_matches(&matches).unwrap_or_else(|e| e.format(&mut cmd).exit())
}
