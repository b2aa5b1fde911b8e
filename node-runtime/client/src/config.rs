//! Daemon config files: one TOML file per daemon, whose keys are the long names of one
//! subcommand's flags (`state-dir = "..."` is `--state-dir ...`).
//!
//! clap stays the source of truth. The command line is parsed once leniently to learn which
//! flags were given and where `--config` points; every key of the file whose flag was not given
//! (on the command line or through its environment variable) is then appended to the command
//! line as `--key=value`, and the whole is parsed again, strictly. So a flag given wins, a value
//! only in the file is used, clap's defaults apply last, and every value goes through the same
//! value parser, `requires` and `conflicts_with` as a flag does. Values are checked one by one
//! first, so that a bad one is reported with the file, the line and the key.

use std::ffi::OsString;
use std::ops::Range;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Command};
pub use toml::Spanned;

/// How a key's value is written in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    String,
    Integer,
    Bool,
    /// An array of strings: a flag that may be repeated.
    List,
}

/// One key's value as read from the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileValue {
    String(String),
    Integer(u64),
    Bool(bool),
    List(Vec<String>),
}

/// The value types a config key may have.
pub trait ToFileValue {
    const KIND: Kind;
    fn to_file_value(&self) -> FileValue;
}

impl ToFileValue for String {
    const KIND: Kind = Kind::String;
    fn to_file_value(&self) -> FileValue {
        FileValue::String(self.clone())
    }
}

impl ToFileValue for PathBuf {
    const KIND: Kind = Kind::String;
    fn to_file_value(&self) -> FileValue {
        // TOML strings are UTF-8, so the path was too.
        FileValue::String(self.to_string_lossy().into_owned())
    }
}

impl ToFileValue for u64 {
    const KIND: Kind = Kind::Integer;
    fn to_file_value(&self) -> FileValue {
        FileValue::Integer(*self)
    }
}

impl ToFileValue for bool {
    const KIND: Kind = Kind::Bool;
    fn to_file_value(&self) -> FileValue {
        FileValue::Bool(*self)
    }
}

impl ToFileValue for Vec<String> {
    const KIND: Kind = Kind::List;
    fn to_file_value(&self) -> FileValue {
        FileValue::List(self.clone())
    }
}

impl ToFileValue for Vec<PathBuf> {
    const KIND: Kind = Kind::List;
    fn to_file_value(&self) -> FileValue {
        FileValue::List(
            self.iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect(),
        )
    }
}

/// One key present in a file, with the byte range of its value.
#[derive(Debug, Clone)]
pub struct Entry {
    pub key: String,
    pub value: FileValue,
    pub span: Range<usize>,
}

/// What `config_file!` generates: the keys and the values present.
pub trait ConfigKeys {
    /// Every key, in declaration order, with its kind.
    fn keys() -> Vec<(String, Kind)>;
    /// The keys present in this file.
    fn entries(&self) -> Vec<Entry>;
}

/// A daemon's config file: its keys are the flags of one subcommand.
pub trait ConfigFile: ConfigKeys + serde::de::DeserializeOwned {
    /// The subcommand (of the binary's top-level command) whose flags the keys are.
    const SUBCOMMAND: &'static str;
    /// Long names of the subcommand's flags (its own and the global ones) that have no key:
    /// `--config` itself, client-only and one-shot flags.
    const CLI_ONLY: &'static [&'static str];
    /// Keys someone might write to give a secret inline, each with the key to use instead.
    /// They are refused with that advice rather than as merely unknown.
    const INLINE_SECRETS: &'static [(&'static str, &'static str)];
    /// Keys whose value is the path of a file holding a secret.
    const SECRET_PATHS: &'static [&'static str];
}

/// Declares a config file struct: every field is one key (the field's name in kebab-case, which
/// must be the long name of a flag), unknown keys are errors, and each value keeps its span.
/// The invoking crate needs `serde` (derive).
#[macro_export]
macro_rules! config_file {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $field:ident : $ty:ty ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Default, serde::Deserialize)]
        #[serde(deny_unknown_fields, rename_all = "kebab-case")]
        pub struct $name {
            $( pub $field: Option<$crate::config::Spanned<$ty>>, )*
        }

        impl $crate::config::ConfigKeys for $name {
            fn keys() -> Vec<(String, $crate::config::Kind)> {
                vec![$( (
                    stringify!($field).replace('_', "-"),
                    <$ty as $crate::config::ToFileValue>::KIND,
                ) ),*]
            }

            fn entries(&self) -> Vec<$crate::config::Entry> {
                let mut out = Vec::new();
                $(
                    if let Some(v) = &self.$field {
                        out.push($crate::config::Entry {
                            key: stringify!($field).replace('_', "-"),
                            value: $crate::config::ToFileValue::to_file_value(v.get_ref()),
                            span: v.span(),
                        });
                    }
                )*
                out
            }
        }
    };
}

/// A config file that cannot be used: the file, and where known the line and the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.render())]
pub struct ConfigError {
    pub path: PathBuf,
    pub line: Option<usize>,
    pub key: Option<String>,
    pub message: String,
}

impl ConfigError {
    fn render(&self) -> String {
        let mut s = format!("config file {}", self.path.display());
        if let Some(l) = self.line {
            s.push_str(&format!(":{l}"));
        }
        if let Some(k) = &self.key {
            s.push_str(&format!(": {k}"));
        }
        s.push_str(": ");
        s.push_str(&self.message);
        s
    }
}

/// The 1-based line of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The key written on the line holding `offset` (`key = ...`), if any.
fn key_on_line(text: &str, offset: usize) -> Option<String> {
    let end = offset.min(text.len());
    let start = text[..end].rfind('\n').map_or(0, |i| i + 1);
    let line = text[start..].lines().next().unwrap_or("");
    let (key, _) = line.split_once('=')?;
    let key = key.trim().trim_matches(|c| c == '"' || c == '\'');
    (!key.is_empty() && !key.starts_with('#')).then(|| key.to_string())
}

/// Parses a config file's text: syntax, unknown keys and value types.
pub fn parse<C: ConfigFile>(path: &Path, text: &str) -> Result<C, ConfigError> {
    let err = |line, key, message: String| ConfigError {
        path: path.to_path_buf(),
        line,
        key,
        message,
    };
    let e = match toml::from_str::<C>(text) {
        Ok(c) => return check_secret_paths(path, text, c),
        Err(e) => e,
    };
    let line = e.span().map(|s| line_of(text, s.start));
    let message = e.message().trim().to_string();
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let key = rest.split('`').next().unwrap_or("").to_string();
        if let Some((_, instead)) = C::INLINE_SECRETS.iter().find(|(k, _)| *k == key) {
            return Err(err(
                line,
                Some(key),
                format!(
                    "secrets are not accepted inline: put it in a file (mode 0600) and set \
                     `{instead}` to its path"
                ),
            ));
        }
        return Err(err(
            line,
            Some(key),
            format!(
                "unknown key (the keys are the flags of `{}`)",
                C::SUBCOMMAND
            ),
        ));
    }
    let key = e.span().and_then(|s| key_on_line(text, s.start));
    // toml says "expected a sequence" for an array; say what a user writes.
    let message = message.replace("a sequence", "an array of strings");
    Err(err(line, key, message))
}

fn check_secret_paths<C: ConfigFile>(path: &Path, text: &str, c: C) -> Result<C, ConfigError> {
    for e in c.entries() {
        if !C::SECRET_PATHS.contains(&e.key.as_str()) {
            continue;
        }
        if let FileValue::String(v) = &e.value {
            if v.contains('\n') || v.contains("-----BEGIN") || v.trim().is_empty() {
                return Err(ConfigError {
                    path: path.to_path_buf(),
                    line: Some(line_of(text, e.span.start)),
                    key: Some(e.key.clone()),
                    message: "takes the path of a file holding the secret, not the secret \
                              itself (secrets are never written inline)"
                        .into(),
                });
            }
        }
    }
    Ok(c)
}

/// The args of `sub` as a user passes them to it: its own and the top-level global ones,
/// without help and version.
pub fn subcommand_args<'a>(cmd: &'a Command, sub: &'a Command) -> Vec<&'a Arg> {
    let mut out: Vec<&Arg> = Vec::new();
    for a in cmd
        .get_arguments()
        .filter(|a| a.is_global_set())
        .chain(sub.get_arguments())
    {
        if matches!(
            a.get_action(),
            ArgAction::Help | ArgAction::HelpShort | ArgAction::HelpLong | ArgAction::Version
        ) || out.iter().any(|o| o.get_id() == a.get_id())
        {
            continue;
        }
        out.push(a);
    }
    out
}

/// Where the value of `id` came from: the subcommand's matches know the global args too.
fn source(sub: &ArgMatches, id: &str) -> Option<ValueSource> {
    sub.value_source(id)
}

fn given(source: Option<ValueSource>) -> bool {
    matches!(
        source,
        Some(ValueSource::CommandLine) | Some(ValueSource::EnvVariable)
    )
}

/// Checks one value with the flag's own value parser; the message without clap's framing.
fn check_value(arg: &Arg, long: &str, value: &str) -> Result<(), String> {
    use clap::builder::Resettable;
    // The flag itself, alone: without its relations to flags the probe does not have.
    let probe = Command::new("config")
        .no_binary_name(true)
        .disable_help_flag(true)
        .arg(
            arg.clone()
                .global(false)
                .required(false)
                .requires(Resettable::Reset)
                .conflicts_with(Resettable::Reset)
                .env(Resettable::Reset)
                .default_value(Resettable::Reset)
                .action(ArgAction::Set)
                .num_args(1),
        );
    match probe.try_get_matches_from([format!("--{long}={value}")]) {
        Ok(_) => Ok(()),
        Err(e) => {
            let why = match std::error::Error::source(&e) {
                Some(s) => s.to_string(),
                None => {
                    let text = e.render().to_string();
                    let first = text.lines().next().unwrap_or("").to_string();
                    first.strip_prefix("error: ").unwrap_or(&first).to_string()
                }
            };
            Err(format!("invalid value {value:?}: {why}"))
        }
    }
}

/// The command-line words that stand for one key of the file.
fn words(arg: &Arg, long: &str, value: &FileValue) -> Vec<String> {
    match value {
        FileValue::Bool(b) => match arg.get_action() {
            ArgAction::SetTrue if *b => vec![format!("--{long}")],
            ArgAction::SetFalse if !*b => vec![format!("--{long}")],
            ArgAction::SetTrue | ArgAction::SetFalse => vec![],
            _ => vec![format!("--{long}={b}")],
        },
        FileValue::String(s) => vec![format!("--{long}={s}")],
        FileValue::Integer(n) => vec![format!("--{long}={n}")],
        FileValue::List(items) => items.iter().map(|i| format!("--{long}={i}")).collect(),
    }
}

/// The outcome of merging a config file into a command line.
#[derive(Debug, Clone, Default)]
pub struct Merged {
    /// The command line to parse: the original one plus the file's keys as flags.
    pub args: Vec<OsString>,
    /// The config file, when `--config` was given to the subcommand.
    pub file: Option<PathBuf>,
    /// Keys whose value came from the file.
    pub from_file: Vec<String>,
}

/// Adds the settings of the `--config` file of subcommand `C::SUBCOMMAND` (if one is given) to
/// `args`. Anything the lenient first parse cannot make sense of (`--help`, a typo) is left for
/// the strict parse to report.
pub fn merge<C: ConfigFile>(cmd: &Command, args: Vec<OsString>) -> Result<Merged, ConfigError> {
    let mut merged = Merged {
        args,
        ..Default::default()
    };
    let Ok(first) = cmd
        .clone()
        .ignore_errors(true)
        .try_get_matches_from(&merged.args)
    else {
        return Ok(merged);
    };
    let Some(sub_m) = first.subcommand_matches(C::SUBCOMMAND) else {
        return Ok(merged);
    };
    if source(sub_m, "config") != Some(ValueSource::CommandLine) {
        return Ok(merged);
    }
    let Some(path) = sub_m
        .get_raw("config")
        .and_then(|mut v| v.next())
        .map(PathBuf::from)
    else {
        return Ok(merged);
    };
    let text = std::fs::read_to_string(&path).map_err(|e| ConfigError {
        path: path.clone(),
        line: None,
        key: None,
        message: format!("cannot read it: {e}"),
    })?;
    let config: C = parse(&path, &text)?;
    let sub = cmd
        .find_subcommand(C::SUBCOMMAND)
        .expect("the config file's subcommand exists");
    let args = subcommand_args(cmd, sub);
    let given_args: Vec<&Arg> = args
        .iter()
        .copied()
        .filter(|a| given(source(sub_m, a.get_id().as_str())))
        .collect();
    let mut extra = Vec::new();
    for entry in config.entries() {
        let err = |message: String| ConfigError {
            path: path.clone(),
            line: Some(line_of(&text, entry.span.start)),
            key: Some(entry.key.clone()),
            message,
        };
        let Some(arg) = args
            .iter()
            .find(|a| a.get_long() == Some(entry.key.as_str()))
        else {
            // The unit tests keep the keys and the flags 1:1; this is a programming error.
            return Err(err(format!(
                "has no flag of `{}` (please report this bug)",
                C::SUBCOMMAND
            )));
        };
        let id = arg.get_id().as_str();
        if given(source(sub_m, id)) {
            continue;
        }
        // A flag given on the command line also overrides the keys it excludes
        // (`--tag` on the command line wins over `branch` in the file).
        let excluded = given_args.iter().any(|g| {
            sub.get_arg_conflicts_with(g)
                .iter()
                .any(|c| c.get_id() == arg.get_id())
                || sub
                    .get_arg_conflicts_with(arg)
                    .iter()
                    .any(|c| c.get_id() == g.get_id())
        });
        if excluded {
            continue;
        }
        let values: Vec<String> = match &entry.value {
            FileValue::String(s) => vec![s.clone()],
            FileValue::Integer(n) => vec![n.to_string()],
            FileValue::List(items) => items.clone(),
            FileValue::Bool(_) => vec![],
        };
        for v in &values {
            check_value(arg, &entry.key, v).map_err(err)?;
        }
        extra.extend(words(arg, &entry.key, &entry.value));
        merged.from_file.push(entry.key.clone());
    }
    merged.args.extend(extra.into_iter().map(OsString::from));
    merged.file = Some(path);
    Ok(merged)
}

/// The effective settings of the subcommand as a config file: keys set by a flag, the
/// environment or the file uncommented, defaults and unset keys commented out, each with where
/// its value came from. `--check-config` prints it; it parses as a config file.
pub fn render_effective<C: ConfigFile>(
    cmd: &Command,
    matches: &ArgMatches,
    merged: &Merged,
) -> String {
    let sub = cmd
        .find_subcommand(C::SUBCOMMAND)
        .expect("the config file's subcommand exists");
    let Some(sub_m) = matches.subcommand_matches(C::SUBCOMMAND) else {
        return String::new();
    };
    let args = subcommand_args(cmd, sub);
    let mut out = format!(
        "# Effective settings of `{} {}`: flags, then {}, then defaults.\n",
        cmd.get_name(),
        C::SUBCOMMAND,
        merged
            .file
            .as_ref()
            .map_or("no config file".to_string(), |p| p.display().to_string())
    );
    for (key, kind) in C::keys() {
        let Some(arg) = args.iter().find(|a| a.get_long() == Some(key.as_str())) else {
            continue;
        };
        let id = arg.get_id().as_str();
        let raw: Vec<String> = sub_m
            .get_raw(id)
            .map(|v| v.map(|s| s.to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        let origin = match source(sub_m, id) {
            None => {
                out.push_str(&format!("# {key}: not set\n"));
                continue;
            }
            Some(ValueSource::DefaultValue) => None,
            Some(ValueSource::EnvVariable) => Some(format!(
                "environment {}",
                arg.get_env()
                    .map(|e| e.to_string_lossy().into_owned())
                    .unwrap_or_default()
            )),
            Some(_) if merged.from_file.contains(&key) => Some(
                merged
                    .file
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
            ),
            Some(_) => Some("command line".to_string()),
        };
        let value = match kind {
            Kind::List => toml::Value::Array(raw.into_iter().map(toml::Value::String).collect()),
            Kind::Bool => toml::Value::Boolean(raw.first().is_some_and(|v| v == "true")),
            Kind::Integer => match raw.first().and_then(|v| v.parse::<i64>().ok()) {
                Some(n) => toml::Value::Integer(n),
                None => toml::Value::String(raw.join(",")),
            },
            Kind::String => toml::Value::String(raw.join(",")),
        };
        match origin {
            Some(o) => out.push_str(&format!("{key} = {value}  # {o}\n")),
            None => out.push_str(&format!("# {key} = {value}  # default\n")),
        }
    }
    out
}

/// A key's value as TOML text.
pub fn toml_value(value: &FileValue) -> String {
    let v = match value {
        FileValue::String(s) => toml::Value::String(s.clone()),
        FileValue::Integer(n) => match i64::try_from(*n) {
            Ok(n) => toml::Value::Integer(n),
            Err(_) => toml::Value::String(n.to_string()),
        },
        FileValue::Bool(b) => toml::Value::Boolean(*b),
        FileValue::List(items) => {
            toml::Value::Array(items.iter().cloned().map(toml::Value::String).collect())
        }
    };
    v.to_string()
}

/// A documented template with some keys set: the line documenting each key (`# key = ...`,
/// or `key = ...` where the template sets it) becomes `key = value`; keys the template does not
/// mention are appended. Everything else, the documentation, is kept.
pub fn set_keys(template: &str, values: &[(&str, FileValue)]) -> String {
    let mut lines: Vec<String> = template.lines().map(str::to_string).collect();
    for (key, value) in values {
        let line = format!("{key} = {}", toml_value(value));
        let documents = |l: &str| {
            let l = l.strip_prefix("# ").unwrap_or(l);
            l.split_once(" = ").is_some_and(|(k, _)| k == *key)
        };
        match lines.iter().position(|l| documents(l)) {
            Some(i) => lines[i] = line,
            None => lines.push(line),
        }
    }
    let mut out = lines.join("\n");
    out.push('\n');
    out
}

/// Checks that the keys of `C` and the flags of its subcommand are 1:1 (every key is a flag,
/// every flag but `C::CLI_ONLY` is a key) and that each key's kind fits its flag (a list for a
/// repeatable flag, a bool for a switch). For the binaries' unit tests.
pub fn check_one_to_one<C: ConfigFile>(cmd: &Command) -> Result<(), String> {
    let sub = cmd
        .find_subcommand(C::SUBCOMMAND)
        .ok_or_else(|| format!("no subcommand {}", C::SUBCOMMAND))?;
    let args = subcommand_args(cmd, sub);
    let keys = C::keys();
    let mut problems = Vec::new();
    for (key, kind) in &keys {
        let Some(arg) = args.iter().find(|a| a.get_long() == Some(key.as_str())) else {
            problems.push(format!("key {key} is not a flag"));
            continue;
        };
        if C::CLI_ONLY.contains(&key.as_str()) {
            problems.push(format!("key {key} is listed as command-line only"));
        }
        let repeatable = matches!(arg.get_action(), ArgAction::Append);
        let switch = matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse)
            || arg.get_value_parser().type_id() == clap::builder::ValueParser::bool().type_id();
        let fits = match kind {
            Kind::List => repeatable,
            Kind::Bool => switch,
            Kind::String | Kind::Integer => !repeatable && !switch,
        };
        if !fits {
            problems.push(format!(
                "key {key} is a {kind:?} but its flag is {:?}",
                arg.get_action()
            ));
        }
    }
    for arg in &args {
        let Some(long) = arg.get_long() else {
            continue;
        };
        if !C::CLI_ONLY.contains(&long) && !keys.iter().any(|(k, _)| k == long) {
            problems.push(format!(
                "flag --{long} has no key (nor is it command-line only)"
            ));
        }
    }
    for (key, instead) in C::INLINE_SECRETS {
        if !keys.iter().any(|(k, _)| k == instead) || keys.iter().any(|(k, _)| k == key) {
            problems.push(format!(
                "inline secret {key} -> {instead} is not a key pair"
            ));
        }
    }
    for key in C::SECRET_PATHS {
        if !keys.iter().any(|(k, _)| k == key) {
            problems.push(format!("secret path {key} is not a key"));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n"))
    }
}

/// Checks a documented config template: every key appears in it as a commented-out
/// `# key = value` line, and uncommenting all of them gives a valid file whose values are the
/// flags' defaults (where a flag has one; the others show an example). So the documentation
/// cannot go stale.
pub fn check_template<C: ConfigFile>(cmd: &Command, template: &str) -> Result<(), String> {
    let sub = cmd
        .find_subcommand(C::SUBCOMMAND)
        .ok_or_else(|| format!("no subcommand {}", C::SUBCOMMAND))?;
    let args = subcommand_args(cmd, sub);
    let keys = C::keys();
    let is_key_line = |l: &str| {
        l.strip_prefix("# ")
            .and_then(|r| r.split_once(" = "))
            .is_some_and(|(k, _)| keys.iter().any(|(key, _)| key == k))
    };
    let uncommented: String = template
        .lines()
        .map(|l| {
            if is_key_line(l) {
                l.strip_prefix("# ").unwrap_or(l).to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let parsed: C = parse(Path::new("template"), &uncommented).map_err(|e| e.to_string())?;
    let entries = parsed.entries();
    let mut problems = Vec::new();
    for (key, _) in &keys {
        let Some(entry) = entries.iter().find(|e| &e.key == key) else {
            problems.push(format!("key {key} is not documented as `# {key} = ...`"));
            continue;
        };
        let Some(arg) = args.iter().find(|a| a.get_long() == Some(key.as_str())) else {
            continue;
        };
        let defaults: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        let documented: Vec<String> = match &entry.value {
            FileValue::String(s) => vec![s.clone()],
            FileValue::Integer(n) => vec![n.to_string()],
            FileValue::Bool(b) => vec![b.to_string()],
            FileValue::List(items) => items.clone(),
        };
        if !defaults.is_empty() && documented != defaults {
            problems.push(format!(
                "key {key} is documented as {documented:?} but its default is {defaults:?}"
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Parser, Subcommand};

    #[derive(Parser, Debug)]
    #[command(name = "demo")]
    struct Cli {
        #[arg(
            long,
            global = true,
            default_value = "text",
            env = "DEMO_TEST_LOG_FORMAT"
        )]
        log_format: String,
        #[arg(long, global = true)]
        server: Option<String>,
        #[command(subcommand)]
        command: Cmd,
    }

    #[derive(Subcommand, Debug)]
    #[allow(clippy::large_enum_variant)]
    enum Cmd {
        Serve {
            #[arg(long)]
            config: Option<PathBuf>,
            #[arg(long, required = true)]
            repo: String,
            #[arg(long, default_value = "/var/lib/demo")]
            state_dir: PathBuf,
            #[arg(long, default_value_t = 10)]
            max_bytes: u64,
            #[arg(long, value_parser = parse_seconds, default_value = "30s")]
            interval: u64,
            #[arg(long = "label")]
            labels: Vec<String>,
            #[arg(long)]
            allow_net_raw: bool,
            #[arg(long, default_value_t = true, action = ArgAction::Set)]
            prune: bool,
            #[arg(long, conflicts_with = "tag")]
            branch: Option<String>,
            #[arg(long)]
            tag: Option<String>,
            #[arg(long, requires = "tls_cert")]
            tls_key: Option<PathBuf>,
            #[arg(long)]
            tls_cert: Option<PathBuf>,
        },
        Other,
    }

    fn parse_seconds(s: &str) -> Result<u64, String> {
        s.strip_suffix('s')
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| format!("{s:?} is not a number of seconds like 30s"))
    }

    crate::config_file! {
        pub struct DemoConfig {
            log_format: String,
            repo: String,
            state_dir: PathBuf,
            max_bytes: u64,
            interval: String,
            label: Vec<String>,
            allow_net_raw: bool,
            prune: bool,
            branch: String,
            tag: String,
            tls_key: PathBuf,
            tls_cert: PathBuf,
        }
    }

    impl ConfigFile for DemoConfig {
        const SUBCOMMAND: &'static str = "serve";
        const CLI_ONLY: &'static [&'static str] = &["config", "server"];
        const INLINE_SECRETS: &'static [(&'static str, &'static str)] =
            &[("tls-key-pem", "tls-key")];
        const SECRET_PATHS: &'static [&'static str] = &["tls-key"];
    }

    fn file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("demo.toml");
        std::fs::write(&p, text).unwrap();
        (dir, p)
    }

    fn run(args: &[&str]) -> Result<(Cli, Merged), String> {
        let cmd = <Cli as clap::CommandFactory>::command();
        let merged = merge::<DemoConfig>(&cmd, args.iter().map(OsString::from).collect())
            .map_err(|e| e.to_string())?;
        let m = cmd
            .try_get_matches_from(&merged.args)
            .map_err(|e| e.to_string())?;
        Ok((
            <Cli as clap::FromArgMatches>::from_arg_matches(&m).unwrap(),
            merged,
        ))
    }

    /// The settings of `serve` the tests look at.
    #[derive(Debug, PartialEq)]
    struct Served {
        state_dir: PathBuf,
        max_bytes: u64,
        interval: u64,
        labels: Vec<String>,
        allow_net_raw: bool,
        prune: bool,
        branch: Option<String>,
        tag: Option<String>,
    }

    fn serve(cli: Cli) -> Served {
        match cli.command {
            Cmd::Serve {
                state_dir,
                max_bytes,
                interval,
                labels,
                allow_net_raw,
                prune,
                branch,
                tag,
                ..
            } => Served {
                state_dir,
                max_bytes,
                interval,
                labels,
                allow_net_raw,
                prune,
                branch,
                tag,
            },
            Cmd::Other => panic!("not serve"),
        }
    }

    #[test]
    fn file_values_are_used_and_flags_win() {
        let (_d, p) = file(
            "repo = \"file:///r\"\nstate-dir = \"/from/file\"\nmax-bytes = 99\ninterval = \"5s\"\n\
             label = [\"a=1\", \"b=2\"]\nallow-net-raw = true\nprune = false\nbranch = \"main\"\n\
             log-format = \"json\"\n",
        );
        let p = p.to_str().unwrap();
        let (cli, merged) = run(&["demo", "serve", "--config", p]).unwrap();
        assert_eq!(cli.log_format, "json");
        assert_eq!(
            serve(cli),
            Served {
                state_dir: "/from/file".into(),
                max_bytes: 99,
                interval: 5,
                labels: vec!["a=1".into(), "b=2".into()],
                allow_net_raw: true,
                prune: false,
                branch: Some("main".into()),
                tag: None,
            }
        );
        assert!(merged.from_file.contains(&"state-dir".to_string()));

        // Flags win, a list on the command line replaces the file's, and a flag that conflicts
        // with a key (--tag against branch) overrides it too.
        let (cli, _) = run(&[
            "demo",
            "serve",
            "--state-dir",
            "/flag",
            "--label",
            "c=3",
            "--tag",
            "v1",
            "--config",
            p,
            "--prune",
            "true",
            "--log-format",
            "text",
        ])
        .unwrap();
        assert_eq!(cli.log_format, "text");
        let s = serve(cli);
        assert_eq!(s.state_dir, PathBuf::from("/flag"));
        assert_eq!(s.max_bytes, 99);
        assert_eq!(s.labels, vec!["c=3".to_string()]);
        assert!(s.prune);
        assert_eq!((s.branch, s.tag), (None, Some("v1".into())));
    }

    #[test]
    fn defaults_apply_last_and_required_flags_can_come_from_the_file() {
        let (_d, p) = file("repo = \"file:///r\"\n");
        let (cli, _) = run(&["demo", "serve", "--config", p.to_str().unwrap()]).unwrap();
        let s = serve(cli);
        assert_eq!(
            (s.state_dir, s.max_bytes, s.interval),
            ("/var/lib/demo".into(), 10, 30)
        );
        assert!(s.labels.is_empty() && !s.allow_net_raw && s.prune);
        // Without the file the required flag is missing, as before.
        let e = run(&["demo", "serve"]).unwrap_err();
        assert!(e.contains("--repo"), "{e}");
        // And a file that lacks it fails the same way.
        let (_d2, p2) = file("max-bytes = 1\n");
        let e = run(&["demo", "serve", "--config", p2.to_str().unwrap()]).unwrap_err();
        assert!(e.contains("--repo"), "{e}");
    }

    #[test]
    fn requires_is_checked_across_flag_and_file() {
        let (_d, p) = file("repo = \"r\"\ntls-cert = \"/c.pem\"\n");
        let (cli, _) = run(&[
            "demo",
            "serve",
            "--tls-key",
            "/k.pem",
            "--config",
            p.to_str().unwrap(),
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Cmd::Serve {
                tls_cert: Some(_),
                tls_key: Some(_),
                ..
            }
        ));
    }

    #[test]
    fn unknown_key_names_the_file_the_key_and_the_line() {
        let (_d, p) = file("repo = \"r\"\n\n# a comment\nstate-dri = \"/x\"\n");
        let e = run(&["demo", "serve", "--config", p.to_str().unwrap()]).unwrap_err();
        assert_eq!(
            e,
            format!(
                "config file {}:4: state-dri: unknown key (the keys are the flags of `serve`)",
                p.display()
            )
        );
    }

    #[test]
    fn a_value_of_the_wrong_type_names_the_key_and_the_line() {
        let (_d, p) = file("repo = \"r\"\nmax-bytes = \"lots\"\n");
        let e = run(&["demo", "serve", "--config", p.to_str().unwrap()]).unwrap_err();
        assert!(
            e.starts_with(&format!(
                "config file {}:2: max-bytes: invalid type: string",
                p.display()
            )),
            "{e}"
        );
        let (_d, p) = file("repo = \"r\"\nlabel = \"a=1\"\n");
        let e = run(&["demo", "serve", "--config", p.to_str().unwrap()]).unwrap_err();
        assert!(
            e.contains(":2: label: invalid type: string \"a=1\", expected an array of strings"),
            "{e}"
        );
        let (_d, p) = file("repo = \"r\"\nallow-net-raw = \"yes\"\n");
        let e = run(&["demo", "serve", "--config", p.to_str().unwrap()]).unwrap_err();
        assert!(e.contains(":2: allow-net-raw: invalid type"), "{e}");
    }

    #[test]
    fn a_value_the_flag_refuses_names_the_key_and_the_line() {
        let (_d, p) = file("repo = \"r\"\n\ninterval = \"soon\"\n");
        let e = run(&["demo", "serve", "--config", p.to_str().unwrap()]).unwrap_err();
        assert_eq!(
            e,
            format!(
                "config file {}:3: interval: invalid value \"soon\": \"soon\" is not a number of seconds like 30s",
                p.display()
            )
        );
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let (_d, p) = file("repo = \"r\"\nstate-dir = \n");
        let e = run(&["demo", "serve", "--config", p.to_str().unwrap()]).unwrap_err();
        assert!(
            e.starts_with(&format!("config file {}:2", p.display())),
            "{e}"
        );
        let (_d, p) = file("repo = \"r\"\nrepo = \"s\"\n");
        let e = run(&["demo", "serve", "--config", p.to_str().unwrap()]).unwrap_err();
        assert!(e.contains(":2:") && e.contains("duplicate"), "{e}");
    }

    #[test]
    fn inline_secrets_are_refused() {
        let (_d, p) = file("repo = \"r\"\ntls-key-pem = \"-----BEGIN PRIVATE KEY-----\"\n");
        let e = run(&["demo", "serve", "--config", p.to_str().unwrap()]).unwrap_err();
        assert!(
            e.contains(":2: tls-key-pem: secrets are not accepted inline")
                && e.contains("`tls-key`"),
            "{e}"
        );
        let (_d, p) =
            file("repo = \"r\"\ntls-key = \"\"\"\n-----BEGIN PRIVATE KEY-----\nMIIE\n\"\"\"\n");
        let e = run(&["demo", "serve", "--config", p.to_str().unwrap()]).unwrap_err();
        assert!(e.contains(":2: tls-key: takes the path of a file"), "{e}");
    }

    #[test]
    fn a_missing_file_is_an_error_and_other_subcommands_ignore_config() {
        let e = run(&["demo", "serve", "--config", "/nonexistent/demo.toml"]).unwrap_err();
        assert!(
            e.starts_with("config file /nonexistent/demo.toml: cannot read it:"),
            "{e}"
        );
        assert!(run(&["demo", "other"]).is_ok());
    }

    #[test]
    fn keys_and_flags_are_one_to_one() {
        let cmd = <Cli as clap::CommandFactory>::command();
        check_one_to_one::<DemoConfig>(&cmd).unwrap();
        let template =
            "# A demo.\n# log-format = \"text\"\n# repo = \"https://example.org/r.git\"\n\
            # state-dir = \"/var/lib/demo\"\n# max-bytes = 10\n# interval = \"30s\"\n# label = []\n\
            # allow-net-raw = false\n# prune = true\n# branch = \"main\"\n# tag = \"v1\"\n\
            # tls-key = \"/k.pem\"\n# tls-cert = \"/c.pem\"\n";
        check_template::<DemoConfig>(&cmd, template).unwrap();
        let stale = template.replace("max-bytes = 10", "max-bytes = 11");
        let e = check_template::<DemoConfig>(&cmd, &stale).unwrap_err();
        assert!(
            e.contains("max-bytes is documented as [\"11\"] but its default is [\"10\"]"),
            "{e}"
        );
        let missing = template.replace("# prune = true\n", "");
        let e = check_template::<DemoConfig>(&cmd, &missing).unwrap_err();
        assert!(e.contains("key prune is not documented"), "{e}");
    }

    #[test]
    fn set_keys_keeps_the_documentation() {
        let template = "# Doc.\n# repo = \"https://example.org\"\n# prune = true\nnode = [\"a\"]\n";
        let out = set_keys(
            template,
            &[
                ("repo", FileValue::String("file:///r \"q\"".into())),
                ("node", FileValue::List(vec!["b".into()])),
                ("max-bytes", FileValue::Integer(3)),
            ],
        );
        assert_eq!(
            out,
            "# Doc.\nrepo = 'file:///r \"q\"'\n# prune = true\nnode = [\"b\"]\nmax-bytes = 3\n"
        );
    }

    #[test]
    fn effective_settings_parse_as_a_config_file() {
        let (_d, p) = file("repo = \"file:///r\"\nlabel = [\"a=1\"]\nmax-bytes = 7\n");
        let cmd = <Cli as clap::CommandFactory>::command();
        let args = [
            "demo",
            "serve",
            "--config",
            p.to_str().unwrap(),
            "--state-dir",
            "/s",
        ];
        let merged = merge::<DemoConfig>(&cmd, args.iter().map(OsString::from).collect()).unwrap();
        let m = cmd.clone().try_get_matches_from(&merged.args).unwrap();
        let text = render_effective::<DemoConfig>(&cmd, &m, &merged);
        assert!(
            text.contains("state-dir = \"/s\"  # command line"),
            "{text}"
        );
        assert!(
            text.contains(&format!("label = [\"a=1\"]  # {}", p.display())),
            "{text}"
        );
        assert!(text.contains("max-bytes = 7"), "{text}");
        assert!(text.contains("# prune = true  # default"), "{text}");
        assert!(text.contains("# branch: not set"), "{text}");
        let back: DemoConfig = parse(&p, &text).unwrap();
        assert_eq!(back.max_bytes.unwrap().into_inner(), 7);
        assert_eq!(back.state_dir.unwrap().into_inner(), PathBuf::from("/s"));
    }
}
