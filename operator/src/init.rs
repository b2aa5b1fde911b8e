//! `hyperbox-operator init`: check a repository before anything is started, and write the
//! operator's config file for it. The repository is fetched into a temporary directory with
//! the Git source's own code and its manifests go through the same validation as a sync; the
//! file is written (atomically, 0644) only when the repository is reachable and no manifest
//! is invalid.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use hyperbox_client::config::{set_keys, FileValue};

use crate::config::{OperatorConfig, DEFAULT_CONFIG};
use crate::gitsource::{GitAuth, GitConfig, GitRef, GitSource};
use crate::manifests::{assemble, ManifestSet};

#[derive(Debug, Clone)]
pub struct InitOptions {
    pub repo: String,
    pub branch: Option<String>,
    pub path: String,
    pub node: Vec<String>,
    pub auth: GitAuth,
    /// The config file to write.
    pub config: PathBuf,
    /// Replace an existing config file.
    pub force: bool,
}

/// What a check of the repository found.
pub struct Checked {
    pub revision: String,
    pub set: ManifestSet,
}

/// Fetches the repository into a temporary directory and validates its manifests.
pub fn check(opts: &InitOptions) -> Result<Checked> {
    let tmp = tempfile::Builder::new()
        .prefix("hyperbox-init")
        .tempdir()
        .context("create a temporary directory for the repository")?;
    let mut source = GitSource::open(
        &tmp.path().join("repo.git"),
        GitConfig {
            url: opts.repo.clone(),
            reference: match &opts.branch {
                Some(b) => GitRef::Branch(b.clone()),
                None => GitRef::Head,
            },
            path: opts.path.clone(),
            auth: opts.auth.clone(),
        },
    )?;
    let revision = source.fetch().context("the repository is not reachable")?;
    let files = source
        .manifests(&revision)
        .with_context(|| format!("read the manifests of {revision}"))?;
    Ok(Checked {
        revision,
        set: assemble(files),
    })
}

/// A file of the manifest set as the user finds it in the repository (with `--path`).
fn in_repo(dir: &str, report: &str) -> String {
    let dir = dir.trim_matches('/');
    if dir.is_empty() || dir == "." {
        report.to_string()
    } else {
        format!("{dir}/{report}")
    }
}

fn summary(opts: &InitOptions, checked: &Checked) -> String {
    let set = &checked.set;
    let mut out = format!(
        "repository {} ({}) at {}{}\n",
        opts.repo,
        opts.branch
            .as_deref()
            .map_or("HEAD".to_string(), |b| format!("branch {b}")),
        &checked.revision[..checked.revision.len().min(12)],
        if opts.path.is_empty() {
            String::new()
        } else {
            format!(", path {}", opts.path)
        }
    );
    out.push_str(&format!(
        "{} manifest file(s), {} workload(s)\n",
        set.files.len(),
        set.workloads.len()
    ));
    for (name, w) in &set.workloads {
        out.push_str(&format!("  {name:<30} {}\n", in_repo(&opts.path, &w.file)));
    }
    for f in &set.files {
        for note in &f.notes {
            out.push_str(&format!(
                "  note: {}: {note}\n",
                in_repo(&opts.path, &f.path)
            ));
        }
    }
    if set.error_count() > 0 {
        out.push_str(&format!("{} problem(s):\n", set.error_count()));
        for f in &set.files {
            for e in &f.errors {
                out.push_str(&format!("  {}\n", in_repo(&opts.path, e)));
            }
        }
    }
    out
}

/// The config file for these options: the package's documented template with the keys set.
pub fn render(opts: &InitOptions, revision: &str) -> Result<String> {
    let mut keys: Vec<(&str, FileValue)> = vec![("repo", FileValue::String(opts.repo.clone()))];
    if let Some(b) = &opts.branch {
        keys.push(("branch", FileValue::String(b.clone())));
    }
    if !opts.path.is_empty() {
        keys.push(("path", FileValue::String(opts.path.clone())));
    }
    keys.push(("node", FileValue::List(opts.node.clone())));
    let path_key = |k, p: &Option<PathBuf>| {
        p.as_ref()
            .map(|p| (k, FileValue::String(p.display().to_string())))
    };
    keys.extend(path_key("token-file", &opts.auth.token_file));
    keys.extend(path_key("ssh-key", &opts.auth.ssh_key));
    keys.extend(path_key("known-hosts", &opts.auth.known_hosts));
    if let Some(u) = &opts.auth.username {
        keys.push(("username", FileValue::String(u.clone())));
    }
    let text = format!(
        "# Written by `hyperbox-operator init`, which found {} reachable and its\n\
         # manifests valid at commit {revision}.\n{}",
        opts.repo.replace('\n', " "),
        set_keys(DEFAULT_CONFIG, &keys)
    );
    // What is written must be what the operator reads.
    hyperbox_client::config::parse::<OperatorConfig>(&opts.config, &text)
        .context("the config file init would write does not parse (please report this bug)")?;
    Ok(text)
}

/// Writes `text` to `path` atomically with mode 0644: a temporary file in the same directory,
/// renamed into place; without `force` an existing file is never replaced.
pub fn write_config(path: &Path, text: &str, force: bool) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".operator.toml.")
        .tempfile_in(&dir)
        .with_context(|| format!("create a temporary file in {}", dir.display()))?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o644))
        .context("set the config file's mode")?;
    tmp.write_all(text.as_bytes())
        .and_then(|()| tmp.as_file().sync_all())
        .with_context(|| format!("write {}", tmp.path().display()))?;
    if force {
        tmp.persist(path)
            .map_err(|e| e.error)
            .with_context(|| format!("write {}", path.display()))?;
    } else {
        tmp.persist_noclobber(path).map_err(|e| {
            if e.error.kind() == std::io::ErrorKind::AlreadyExists {
                anyhow::anyhow!("{} exists: pass --force to replace it", path.display())
            } else {
                anyhow::Error::new(e.error).context(format!("write {}", path.display()))
            }
        })?;
    }
    Ok(())
}

/// Whether `path` may be replaced without `--force`: it does not exist, or it is the
/// package's file as shipped (no settings to lose: the first run needs no `--force`).
fn replaceable(path: &Path) -> Result<bool> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text == DEFAULT_CONFIG),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
    }
}

/// The whole of `init`: check, report, write. An error means nothing was written.
pub fn run(opts: &InitOptions) -> Result<()> {
    let replace = opts.force || replaceable(&opts.config)?;
    if !replace {
        bail!(
            "{} exists: pass --force to replace it",
            opts.config.display()
        );
    }
    let checked = check(opts)?;
    print!("{}", summary(opts, &checked));
    let problems = checked.set.error_count();
    if problems > 0 {
        bail!(
            "{problems} problem(s) in the manifests (listed above): {} not written",
            opts.config.display()
        );
    }
    let text = render(opts, &checked.revision)?;
    // The shipped file is replaced, anything else only with --force (checked again by the
    // write itself, which never replaces a file that appeared meanwhile).
    write_config(&opts.config, &text, opts.force || opts.config.exists())?;
    println!(
        "wrote {}; start the operator with: systemctl enable --now hyperbox-operator",
        opts.config.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(config: PathBuf) -> InitOptions {
        InitOptions {
            repo: "https://git.example.org/site-a.git".into(),
            branch: Some("main".into()),
            path: "edge/site-a".into(),
            node: vec!["unix:///run/hyperbox/node.sock".into()],
            auth: GitAuth {
                ssh_key: Some("/etc/hyperbox/deploy_key".into()),
                ..Default::default()
            },
            config,
            force: false,
        }
    }

    #[test]
    fn the_written_config_sets_the_keys_and_keeps_the_documentation() {
        let o = opts("/etc/hyperbox/operator.toml".into());
        let text = render(&o, "0123").unwrap();
        let c: OperatorConfig =
            hyperbox_client::config::parse(Path::new("operator.toml"), &text).unwrap();
        assert_eq!(c.repo.unwrap().into_inner(), o.repo);
        assert_eq!(c.branch.unwrap().into_inner(), "main");
        assert_eq!(c.path.unwrap().into_inner(), "edge/site-a");
        assert_eq!(c.node.unwrap().into_inner(), o.node);
        assert_eq!(
            c.ssh_key.unwrap().into_inner(),
            PathBuf::from("/etc/hyperbox/deploy_key")
        );
        assert!(c.interval.is_none(), "defaults stay commented out");
        assert!(text.contains("# How often to poll the repository"));
    }

    #[test]
    fn only_the_shipped_file_is_replaced_without_force() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("operator.toml");
        assert!(replaceable(&p).unwrap(), "a missing file");
        std::fs::write(&p, DEFAULT_CONFIG).unwrap();
        assert!(replaceable(&p).unwrap(), "the package's file as shipped");
        std::fs::write(&p, format!("{DEFAULT_CONFIG}repo = \"x\"\n")).unwrap();
        assert!(!replaceable(&p).unwrap(), "an edited file");
    }

    #[test]
    fn writes_atomically_with_mode_0644_and_never_replaces_without_force() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/operator.toml");
        write_config(&p, "a = 1\n", false).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "a = 1\n");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        let e = write_config(&p, "a = 2\n", false).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("{} exists: pass --force to replace it", p.display())
        );
        write_config(&p, "a = 3\n", true).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "a = 3\n");
        // No temporary files are left behind.
        assert_eq!(std::fs::read_dir(p.parent().unwrap()).unwrap().count(), 1);
    }
}
